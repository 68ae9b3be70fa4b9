"""TensorRT-LLM checkpoint (pipeline.convert.trtllm): names, shapes and values per rank, config.json,
KV-head replication, lm_head padding, uneven PP, round trip, W8A16 gating, bad input.

Expected tensors are sliced here from the HF weights following TensorRT-LLM's tensorrt_llm/models/llama/convert.py rules, not
through the converter's weight map."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import artifacts
from pipeline.convert import hf, trtllm
from pipeline.errors import PipelineError
from pipeline.parallel.mapping import Mapping
from tests.parallel_helpers import Store

H, I, D = 64, 192, 8


@pytest.fixture(scope="session")
def store(tmp_path_factory, default_cfg, tiny_model_dir):
    return Store(tmp_path_factory, default_cfg, tiny_model_dir)


def _rank(ckpt, r):
    return load_file(str(ckpt / f"rank{r}.safetensors"))


def test_names_shapes_and_values_tp2_pp2(store):
    ckpt = store.checkpoint("gqa", "trtllm", 2, 2)
    sd = store.hf("gqa")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "manifest.json"] + [
        f"rank{r}.safetensors" for r in range(4)]
    layer_names = lambda j: {f"transformer.layers.{j}.{n}.weight" for n in (  # noqa: E731
        "input_layernorm", "attention.qkv", "attention.dense", "post_layernorm", "mlp.fc", "mlp.gate", "mlp.proj")}
    for r in range(4):
        tensors = _rank(ckpt, r)
        tp_rank, pp_rank = r % 2, r // 2
        expected = layer_names(0) | layer_names(1)  # local indices 0, 1 on both stages
        expected |= {"transformer.vocab_embedding.weight"} if pp_rank == 0 else {"transformer.ln_f.weight", "lm_head.weight"}
        assert set(tensors) == expected
        for j in (0, 1):
            l = pp_rank * 2 + j  # global layer
            p, t = f"model.layers.{l}.", f"transformer.layers.{j}."
            q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
            rows = slice(tp_rank * 32, (tp_rank + 1) * 32)    # 4 of 8 q heads
            kv_rows = slice(tp_rank * 8, (tp_rank + 1) * 8)   # 1 of 2 kv heads
            assert torch.equal(tensors[t + "attention.qkv.weight"], torch.cat([q[rows], k[kv_rows], v[kv_rows]]))
            assert tensors[t + "attention.qkv.weight"].shape == (48, H)
            assert torch.equal(tensors[t + "attention.dense.weight"], sd[p + "self_attn.o_proj.weight"][:, rows])
            cols = slice(tp_rank * 96, (tp_rank + 1) * 96)
            assert torch.equal(tensors[t + "mlp.fc.weight"], sd[p + "mlp.gate_proj.weight"][cols])  # gate_proj -> fc
            assert torch.equal(tensors[t + "mlp.gate.weight"], sd[p + "mlp.up_proj.weight"][cols])  # up_proj -> gate
            assert torch.equal(tensors[t + "mlp.proj.weight"], sd[p + "mlp.down_proj.weight"][:, cols])
            assert torch.equal(tensors[t + "post_layernorm.weight"], sd[p + "post_attention_layernorm.weight"])
        if pp_rank == 0:
            assert torch.equal(tensors["transformer.vocab_embedding.weight"], sd["model.embed_tokens.weight"])
        else:
            assert torch.equal(tensors["lm_head.weight"], sd["lm_head.weight"][tp_rank * 256:(tp_rank + 1) * 256])
            assert torch.equal(tensors["transformer.ln_f.weight"], sd["model.norm.weight"])


def test_kv_heads_replicated_when_tp_exceeds_them(store):
    ckpt = store.checkpoint("gqa", "trtllm", 4, 1)
    sd = store.hf("gqa")
    k = sd["model.layers.1.self_attn.k_proj.weight"]
    for r in range(4):
        qkv = _rank(ckpt, r)["transformer.layers.1.attention.qkv.weight"]
        assert qkv.shape == ((2 + 1 + 1) * D, H)              # 2 q heads + 1 k + 1 v per rank
        assert torch.equal(qkv[16:24], k[(r // 2) * 8:(r // 2 + 1) * 8])  # rank r holds kv head r // (tp/nkv)
    assert json.loads((ckpt / "config.json").read_text())["num_key_value_heads"] == 2  # stays the original


def test_lm_head_padded_to_multiple_of_tp(store):
    ckpt = store.checkpoint("mha", "trtllm", 4, 1)                # vocab 510 -> 512 rows, 128 per rank
    sd = store.hf("mha")
    heads = [_rank(ckpt, r)["lm_head.weight"] for r in range(4)]
    assert all(h.shape == (128, H) for h in heads)
    full = torch.cat(heads)
    assert torch.equal(full[:510], sd["lm_head.weight"])
    assert torch.count_nonzero(full[510:]) == 0
    assert _rank(ckpt, 0)["transformer.vocab_embedding.weight"].shape == (510, H)  # embedding not padded
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 510     # unpadded in config


def test_uneven_pp_gives_first_stages_the_extra_layer(store):
    ckpt = store.checkpoint("gqa", "trtllm", 1, 3)
    sd = store.hf("gqa")
    owned = {0: [0, 1], 1: [2], 2: [3]}
    for r, layers in owned.items():
        tensors = _rank(ckpt, r)
        assert {n.split(".")[2] for n in tensors if n.startswith("transformer.layers.")} == {
            str(j) for j in range(len(layers))}
        for j, l in enumerate(layers):
            assert torch.equal(tensors[f"transformer.layers.{j}.mlp.proj.weight"],
                               sd[f"model.layers.{l}.mlp.down_proj.weight"])


def test_config_json(store):
    cfg = json.loads((store.checkpoint("gqa", "trtllm", 2, 2, "bf16") / "config.json").read_text())
    assert cfg == {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float32", "vocab_size": 512,
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_size": 8, "intermediate_size": 192, "max_position_embeddings": 512, "hidden_act": "silu",
        "norm_epsilon": 1e-05, "position_embedding_type": "rope_gpt_neox", "rotary_base": 500000.0,
        "rotary_scaling": {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "tie_word_embeddings": False,
        "mlp_bias": False, "attn_bias": False, "qk_layernorm": False,
        "mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2, "cp_size": 1, "moe_tp_size": 2,
                    "moe_ep_size": 1, "gpus_per_node": 8},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None}}
    for r in range(4):
        assert {t.dtype for t in _rank(store.checkpoint("gqa", "trtllm", 2, 2, "bf16"), r).values()} == {torch.bfloat16}
    manifest = artifacts.read_manifest(store.checkpoint("gqa", "trtllm", 2, 2, "bf16"))
    assert manifest["kind"] == "trtllm-checkpoint" and manifest["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}


def test_tied_embeddings_write_lm_head_on_last_stage(store):
    ckpt = store.checkpoint("tied", "trtllm", 2, 2)
    sd = store.hf("tied")
    assert "lm_head.weight" not in sd
    assert torch.equal(torch.cat([_rank(ckpt, 2)["lm_head.weight"], _rank(ckpt, 3)["lm_head.weight"]]),
                       sd["model.embed_tokens.weight"])
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("model,tp,pp,dtype", [("gqa", 1, 1, "fp32"), ("gqa", 2, 2, "fp32"), ("gqa", 4, 1, "fp32"),
                                               ("mha", 4, 2, "fp32"), ("gqa", 1, 3, "fp32"), ("tied", 2, 2, "fp32"),
                                               ("gqa", 2, 2, "bf16"), ("mha", 2, 1, "fp16")])
def test_round_trip_to_hf(store, model, tp, pp, dtype):
    original = store.hf(model)
    _, state = hf.to_hf_state_dict("trtllm", store.checkpoint(model, "trtllm", tp, pp, dtype))
    assert set(state) == set(original)
    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, tensor in original.items():
        assert state[name].dtype == want
        assert torch.equal(state[name], tensor.to(want)), name


def test_round_trip_rejects_diverging_kv_replicas(store, tmp_path):
    """Replicated KV heads must be identical across ranks; a checkpoint where they differ is not ours."""
    ckpt = shutil.copytree(store.checkpoint("gqa", "trtllm", 4, 1), tmp_path / "ckpt")
    path = ckpt / "rank1.safetensors"
    tensors = load_file(str(path))
    tensors["transformer.layers.0.attention.qkv.weight"][16] += 1.0  # k row of rank 1's replica of head 0
    manifest = artifacts.read_manifest(ckpt)
    save_file(tensors, str(path), metadata={"format": "pt"})
    artifacts.write_manifest(ckpt, **{k: v for k, v in manifest.items() if k not in ("files", "created_unix")})
    with pytest.raises(PipelineError, match="copies that every TP rank must share differ"):
        hf.to_hf_state_dict("trtllm", ckpt)


def test_w8a16_without_tensorrt_llm_fails_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import raises ImportError
    with pytest.raises(PipelineError, match=r"convert.trtllm_quant=W8A16 needs the tensorrt_llm package"):
        trtllm.convert(tiny_model_dir, tmp_path / "out", tp=2, dtype="fp16", quant="W8A16")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def stand_in_trtllm_op(monkeypatch):
    """A stand-in for TensorRT-LLM's torch op (plain symmetric int8, no GPU interleave), registered as
    torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix, plus an importable `tensorrt_llm`."""
    calls = []

    def op(w, quant_type):
        calls.append((tuple(w.shape), quant_type))
        scale = w.float().abs().amax(dim=0) / 128
        return torch.clamp(torch.round(w.float() / scale), -128, 127).to(torch.int8), scale.to(w.dtype)

    lib = torch.library.Library("trtllm", "DEF")
    lib.define("symmetric_quantize_last_axis_of_batched_matrix(Tensor weight, ScalarType quant_type) -> (Tensor, Tensor)")
    lib.impl("symmetric_quantize_last_axis_of_batched_matrix", op, "CPU")
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    yield calls
    del lib  # unregisters the op


def test_w8a16_goes_through_the_trtllm_op(tiny_model_dir, tmp_path, stand_in_trtllm_op):
    """With TensorRT-LLM importable, every quantized linear goes through its op, transposed to [in, out].
    This checks our wiring and the file layout around the op, not TensorRT-LLM's int8 bytes."""
    calls = stand_in_trtllm_op
    ckpt = tmp_path / "out"
    trtllm.convert(tiny_model_dir, ckpt, tp=2, pp=1, dtype="fp16", quant="W8A16")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "W8A16", "kv_cache_quant_algo": None}
    tensors = _rank(ckpt, 1)
    assert tensors["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert tensors["transformer.layers.0.attention.qkv.weight"].shape == (H, 48)      # [in, out]
    assert tensors["transformer.layers.0.attention.qkv.per_channel_scale"].shape == (48,)
    assert tensors["transformer.layers.0.attention.qkv.per_channel_scale"].dtype == torch.float16
    assert tensors["transformer.layers.0.mlp.proj.weight"].shape == (96, H)
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight", "transformer.layers.0.input_layernorm.weight"):
        assert tensors[name].dtype == torch.float16  # embedding, lm_head and norms stay in dtype
    assert len(calls) == 2 * 4 * 5 and all(q == torch.int8 for _, q in calls)
    with pytest.raises(PipelineError, match="quant_algo=W8A16 has a GPU-specific int8 layout"):
        trtllm.read_rank(ckpt, Mapping(2, 1))


def test_invalid_quant_algo(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match="convert.trtllm_quant must be null or W8A16; got 'FP8'"):
        trtllm.convert(tiny_model_dir, tmp_path / "out", tp=1, quant="FP8")


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, r"parallel.tp must divide model.num_heads=8; got 3"),
    ({"tp": 16}, r"parallel.tp must divide model.num_heads=8; got 16"),
    ({"tp": 1, "pp": 5}, r"parallel.pp must be <= model.num_layers=4; got 5"),
    ({"tp": 1, "pp": 0}, r"parallel.pp must be an integer >= 1"),
])
def test_impossible_tp_pp(tiny_model_dir, tmp_path, kwargs, match):
    with pytest.raises(PipelineError, match=match) as info:
        trtllm.convert(tiny_model_dir, tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_tp_dividing_neither_heads_nor_kv_heads(tiny_model_dir, tmp_path):
    """12 heads, 4 KV heads, tp=6: 6 divides 12 but neither divides 4 nor is a multiple of it."""
    src = shutil.copytree(tiny_model_dir, tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw.update(num_attention_heads=12, num_key_value_heads=4, hidden_size=96, head_dim=8)
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PipelineError, match=r"parallel.tp must divide model.num_kv_heads=4 or be a multiple of it; got 6"):
        trtllm.convert(src, tmp_path / "out", tp=6)
    assert not (tmp_path / "out").exists()


def test_truncated_rank_file_detected_before_loading(store, tmp_path):
    ckpt = shutil.copytree(store.checkpoint("gqa", "trtllm", 2, 2), tmp_path / "ckpt")
    victim = ckpt / "rank3.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(PipelineError, match=r"rank3.safetensors: size \d+ != \d+ in manifest.json \(truncated"):
        trtllm.read_rank(ckpt, Mapping(2, 2, rank=0))
    with pytest.raises(PipelineError, match="truncated"):
        hf.to_hf_state_dict("trtllm", ckpt)


def _rewrite(ckpt, edit):
    manifest = artifacts.read_manifest(ckpt)
    edit(ckpt)
    artifacts.write_manifest(ckpt, **{k: v for k, v in manifest.items() if k not in ("files", "created_unix")})


def test_missing_config_key(store, tmp_path):
    ckpt = shutil.copytree(store.checkpoint("gqa", "trtllm", 2, 1), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["rotary_base"]
    _rewrite(ckpt, lambda c: (c / "config.json").write_text(json.dumps(cfg)))
    with pytest.raises(PipelineError, match=r"config.json: required key 'rotary_base' is missing"):
        trtllm.read_rank(ckpt, Mapping(2, 1))


def test_leftover_tensor_raises(store, tmp_path):
    """TensorRT-LLM 1.x's save_checkpoint adds RoPE tables; this reader knows no HF name for them."""
    ckpt = shutil.copytree(store.checkpoint("gqa", "trtllm", 1, 1), tmp_path / "ckpt")
    tensors = _rank(ckpt, 0)
    tensors["embed_positions"] = torch.zeros(512, 8)
    _rewrite(ckpt, lambda c: save_file(tensors, str(c / "rank0.safetensors")))
    with pytest.raises(PipelineError, match=r"rank0.safetensors: tensor 'embed_positions' has no HF name"):
        trtllm.read_rank(ckpt, Mapping(1, 1))


def test_runner_mapping_must_match_checkpoint(store):
    with pytest.raises(PipelineError, match=r"converted for tp=2 pp=2; the runner was started with tp=2 pp=1"):
        trtllm.read_rank(store.checkpoint("gqa", "trtllm", 2, 2), Mapping(2, 1))


def test_sharded_hf_source_with_index(store, tmp_path):
    """A Hugging Face directory split into several safetensors files plus model.safetensors.index.json."""
    original = store.hf("gqa")
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(store.model("gqa") / "config.json", src / "config.json")
    names = list(original)
    halves = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for file, part in halves.items():
        save_file({n: original[n] for n in part}, str(src / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    trtllm.convert(src, tmp_path / "ckpt", tp=2, pp=2, dtype="fp32")
    _, state = hf.to_hf_state_dict("trtllm", tmp_path / "ckpt")
    assert set(state) == set(original) and all(torch.equal(state[n], original[n]) for n in original)
