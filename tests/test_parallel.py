"""The compact Llama module against Hugging Face, and the TP x PP runner (real torchrun + gloo processes)
on both checkpoint formats against Hugging Face LlamaForCausalLM in float32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.model.llama import Llama, hf_layout_state_dict, rope_inv_freq
from pipeline.parallel.mapping import Mapping
from pipeline.parallel.pp import Stage
from pipeline.convert.load import load_stage
from pipeline.runner.verify import ROOT, hf_reference, torchrun_command, verify
from tests.parallel_helpers import NEW_TOKENS, PROMPTS, Store


@pytest.fixture(scope="session")
def store(tmp_path_factory, default_cfg, tiny_model_dir):
    return Store(tmp_path_factory, default_cfg, tiny_model_dir)


def _hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", ["gqa", "mha", "tied"])
def test_llama_module_matches_hf(store, variant):
    path = store.model(variant)
    args = LlamaArgs.from_hf_config(json.loads((path / "config.json").read_text()), "config.json")
    model = Llama(args)
    model.load_state_dict(hf_layout_state_dict(load_file(str(path / "model.safetensors")), args), strict=True)
    model.eval()
    ref = _hf_model(path)
    ids = torch.tensor([PROMPTS[0] + [1, 2, 3]])
    with torch.inference_mode():
        want = ref(ids).logits
        model.setup_cache(1, 32)
        assert torch.equal(model.inv_freq, ref.model.rotary_emb.inv_freq)
        torch.testing.assert_close(model(ids, torch.arange(10)), want, atol=1e-5, rtol=0)
        # The same positions fed through the KV cache: prefill 6, then one token at a time.
        model.setup_cache(1, 32)
        steps = [model(ids[:, :6], torch.arange(6))]
        steps += [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(6, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},     # Llama 3.1 8B
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},     # Llama 3.2 1B/3B
    {"rope_type": "default", "rope_theta": 500000.0},                          # Llama 3 8B
])
def test_rope_inv_freq_bitwise_equal_to_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rope_parameters=rope)
    want = (ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)[0] if rope["rope_type"] == "llama3"
            else LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)[0])
    args = LlamaArgs.from_hf_config({**hf_cfg.to_dict(), "vocab_size": 128256, "intermediate_size": 14336,
                                     "num_hidden_layers": 32, "rms_norm_eps": 1e-5}, "config.json")
    assert torch.equal(rope_inv_freq(args), want)


def test_transformers4_style_config_reads_the_same(store):
    """Published Llama 3 repos keep rope_theta / rope_scaling at the top level (transformers 4 names)."""
    raw = json.loads((store.model("gqa") / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    old = {**raw, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "eos_token_id": [1, 5, 6]}
    a, b = LlamaArgs.from_hf_config(raw | {"rope_parameters": {**rope, "rope_theta": 500000.0}}, "x"), \
        LlamaArgs.from_hf_config(old, "x")
    assert a == b and b.eos_token_id == 1 and b.rope_theta == 500000.0


def _metrics_ok(m, atol=1e-4):
    assert m["logits_max_abs_diff"] <= atol, m
    assert m["top1_agreement"] == 1.0, m
    assert m["generation_token_exact"] == 1, m


FAST = [("ft", "gqa", 2, 2), ("trtllm", "gqa", 2, 2), ("trtllm", "gqa", 4, 1)]  # incl. KV-head replication
SLOW = [(fmt, model, tp, pp) for fmt in ("ft", "trtllm") for model in ("gqa", "mha") for tp in (1, 2, 4)
        for pp in (1, 2) if (fmt, model, tp, pp) not in FAST and not (fmt == "ft" and model == "gqa" and tp == 4)]
SLOW += [("trtllm", "gqa", 1, 3), ("ft", "tied", 2, 2), ("trtllm", "tied", 2, 2)]  # uneven PP; tied lm_head


@pytest.mark.parametrize("fmt,model,tp,pp", FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW])
def test_runner_matches_hf_fp32(store, fmt, model, tp, pp):
    ckpt = store.checkpoint(model, fmt, tp, pp)
    m = verify(fmt, ckpt, store.model(model), tp, pp, PROMPTS, NEW_TOKENS)
    _metrics_ok(m)
    assert (m["backend"], m["compute_dtype"]) == ("gloo", "float32")
    assert [len(t) for t in m["tokens"]] == [NEW_TOKENS] * len(PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,dtype,atol", [("trtllm", "bf16", 0.05), ("ft", "fp16", 0.01)])
def test_runner_half_precision_close_to_hf(store, fmt, dtype, atol):
    ckpt = store.checkpoint("gqa", fmt, 2, 2, dtype)
    m = verify(fmt, ckpt, store.model("gqa"), 2, 2, PROMPTS, NEW_TOKENS)
    assert m["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert 0 < m["logits_max_abs_diff"] <= atol
    assert m["top1_agreement"] >= 0.8


def test_ft_int8_mode_quantizes_linears_at_load(store):
    """int8_mode=1: the runner quantizes each rank's linears as FasterTransformer does at load time."""
    plain, _ = load_stage("ft", store.checkpoint("gqa", "ft", 1, 1, "bf16"), Mapping(1, 1), torch.device("cpu"))
    int8, info = load_stage("ft", store.checkpoint("gqa", "ft", 1, 1, "bf16", int8_mode=1), Mapping(1, 1),
                            torch.device("cpu"))
    assert info["int8_mode"] == 1
    a, b = plain.state_dict(), int8.state_dict()
    for name in a:
        quantized = any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        assert torch.equal(a[name], b[name]) != quantized, name  # only the linears change
    ref = hf_reference(store.model("gqa"), PROMPTS[:1], NEW_TOKENS)[0]
    out = Stage(int8, Mapping(1, 1), torch.device("cpu")).generate(PROMPTS[0], NEW_TOKENS)
    # bf16 + int8 weights vs fp32: 0.04-0.06 measured (bf16 CPU kernels differ by instruction set)
    assert 0 < float((out["logits"] - ref[0]).abs().max()) < 0.1


def test_single_rank_stage_in_process(store):
    """tp=1, pp=1 needs no process group: load_stage + Stage.generate match HF directly."""
    model, info = load_stage("trtllm", store.checkpoint("gqa", "trtllm", 1, 1), Mapping(1, 1), torch.device("cpu"))
    ref = hf_reference(store.model("gqa"), PROMPTS, NEW_TOKENS)
    stage = Stage(model, Mapping(1, 1), torch.device("cpu"))
    for prompt, (logits, tokens) in zip(PROMPTS, ref):
        out = stage.generate(prompt, NEW_TOKENS)
        torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=0)
        assert out["tokens"] == tokens


def test_truncated_checkpoint_fails_the_launch_with_one_line(store, tmp_path):
    ckpt = shutil.copytree(store.checkpoint("gqa", "trtllm", 1, 1), tmp_path / "ckpt")
    victim = ckpt / "rank0.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(PipelineError, match=r"rank0.safetensors: size \d+ != \d+ in manifest.json \(truncated") as info:
        verify("trtllm", ckpt, store.model("gqa"), 1, 1, PROMPTS, NEW_TOKENS)
    assert "\n" not in str(info.value)


def test_runner_rejects_world_size_not_tp_times_pp(store, tmp_path):
    cmd = torchrun_command("trtllm", store.checkpoint("gqa", "trtllm", 2, 1), 2, 1, PROMPTS, 2,
                           tmp_path / "r.json")
    cmd[cmd.index("--nproc-per-node=2")] = "--nproc-per-node=1"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("pipeline.runner.run: error: world_size=1 must equal parallel.tp * parallel.pp = 2*1; "
            "launch torchrun with --nproc-per-node=2") in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_verify_rejects_impossible_mapping_before_launch(store):
    with pytest.raises(PipelineError, match=r"parallel.tp must be an integer >= 1; got 0"):
        verify("ft", store.checkpoint("gqa", "ft", 1, 1), store.model("gqa"), 0, 1, PROMPTS, 1)


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "pipeline.runner.run", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--prompt-ids" in out.stdout and "--max-new-tokens" in out.stdout


def test_cli_without_torchrun_explains(store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "pipeline.runner.run", "--format", "ft", "--checkpoint",
                          str(store.checkpoint("gqa", "ft", 2, 1)), "--tp", "2", "--pp", "1", "--prompt-ids", "1,2",
                          "--max-new-tokens", "2", "--output", str(tmp_path / "r.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == ("pipeline.runner.run: error: no torch.distributed environment: launch with "
                                  "torchrun --nproc-per-node=2 -m pipeline.runner.run ...")


def test_two_nodes_join_through_torchrun_rendezvous(store, tmp_path):
    """Multi-node tp x pp as README documents it: the same command on every node, joined by torchrun's c10d
    rendezvous. Two torchrun agents on this host stand for two nodes (one rank each, gloo); the pipeline stage on
    the second node must receive the first's activations and the generation must equal Hugging Face's."""
    from safetensors.torch import load_file

    from pipeline.runner.verify import compare
    from tests.helpers import free_port

    output = tmp_path / "result.json"
    cmd = torchrun_command("trtllm", store.checkpoint("gqa", "trtllm", 1, 2), 1, 2, PROMPTS, NEW_TOKENS, output,
                           nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    assert "--nproc-per-node=1" in cmd and "--nnodes=2" in cmd and "--standalone" not in cmd
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    result = json.loads(output.read_text())
    assert (result["tp"], result["pp"], result["backend"]) == (1, 2, "gloo")
    logits = load_file(str(output.with_name(result["logits_file"])))
    metrics = compare(result, [logits[f"prompt{i}"] for i in range(len(PROMPTS))],
                      hf_reference(store.model("gqa"), PROMPTS, NEW_TOKENS))
    _metrics_ok(metrics)


def test_nodes_must_split_the_ranks_evenly(store, tmp_path):
    with pytest.raises(PipelineError, match=r"parallel.tp \* parallel.pp = 3 ranks do not split evenly over 2 nodes"):
        torchrun_command("trtllm", store.checkpoint("gqa", "trtllm", 1, 3), 1, 3, PROMPTS, 1, tmp_path / "r.json",
                         nnodes=2, rdzv_endpoint="127.0.0.1:1")


def test_several_nodes_need_a_rendezvous_endpoint():
    from pipeline.parallel import launch

    with pytest.raises(PipelineError, match=r"nnodes=2 needs a rendezvous endpoint \(host:port of one node"):
        launch.torchrun_command(1, "pipeline.runner.run", [], nnodes=2)
    assert "--standalone" in launch.torchrun_command(2, "pipeline.runner.run", [])
