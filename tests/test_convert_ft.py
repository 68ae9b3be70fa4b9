"""FasterTransformer layout (pipeline.convert.ft): file names, shapes, bytes, config.ini, round trip, bad input.

Expected bytes are computed here independently of the converter's weight map, from the layout of
NVIDIA/FasterTransformer pull requests #575 and #785 (PR #575's np.stack/transpose for MHA, PR #785's concat(q_r,k_r,v_r).T)."""

from __future__ import annotations

import configparser
import json
import re
import shutil

import numpy as np
import pytest
import torch

from pipeline import artifacts
from pipeline.convert import ft, hf
from pipeline.errors import PipelineError
from pipeline.parallel.mapping import Mapping
from tests.parallel_helpers import Store

H, I, L, D = 64, 192, 4, 8


@pytest.fixture(scope="session")
def store(tmp_path_factory, default_cfg, tiny_model_dir):
    return Store(tmp_path_factory, default_cfg, tiny_model_dir)


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The converter's cast: numpy astype for fp32/fp16 (PR #575), torch's round-to-nearest for bf16 bits."""
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return t.numpy().astype({"fp32": np.float32, "fp16": np.float16}[dtype])


def _file(folder, name, dtype):
    return np.fromfile(folder / name, dtype={"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}[dtype])


@pytest.mark.parametrize("model,tp,kv,vocab", [("gqa", 1, 2, 512), ("gqa", 2, 2, 512), ("mha", 4, 8, 510)])
def test_file_names_and_sizes(store, model, tp, kv, vocab):
    folder = store.checkpoint(model, "ft", tp, 1) / f"{tp}-gpu"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 1 + 3 + L * (2 + 5 * tp)  # config.ini + file count of PR #575's converter
    shapes = {"model.wte.weight.bin": (vocab, H), "model.lm_head.weight.bin": (vocab, H),
              "model.final_layernorm.weight.bin": (H,)}
    for l in range(L):
        shapes[f"model.layers.{l}.input_layernorm.weight.bin"] = (H,)
        shapes[f"model.layers.{l}.post_attention_layernorm.weight.bin"] = (H,)
        for r in range(tp):
            shapes[f"model.layers.{l}.attention.query_key_value.weight.{r}.bin"] = (H, (8 + 2 * kv) * D // tp)
            shapes[f"model.layers.{l}.attention.dense.weight.{r}.bin"] = (H // tp, H)
            shapes[f"model.layers.{l}.mlp.gate_proj.weight.{r}.bin"] = (H, I // tp)
            shapes[f"model.layers.{l}.mlp.up_proj.weight.{r}.bin"] = (H, I // tp)
            shapes[f"model.layers.{l}.mlp.down_proj.weight.{r}.bin"] = (I // tp, H)
    assert names == sorted(list(shapes) + ["config.ini"])
    for name, shape in shapes.items():  # FT only warns on a short file: check every size exactly
        assert (folder / name).stat().st_size == 4 * int(np.prod(shape)), name


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_bytes_gqa_tp2(store, dtype):
    """PR #785 layout: QKV.{r} = concat(q heads of r, kv heads of r).T; linears transposed and split."""
    folder = store.checkpoint("gqa", "ft", 2, 1, dtype) / "2-gpu"
    sd = store.hf("gqa")
    for l in (0, 3):
        p = f"model.layers.{l}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        for r in range(2):
            qkv = torch.cat([q[r * 32:(r + 1) * 32], k[r * 8:(r + 1) * 8], v[r * 8:(r + 1) * 8]]).T
            assert np.array_equal(_file(folder, f"{p}attention.query_key_value.weight.{r}.bin", dtype),
                                  _np(qkv.contiguous(), dtype).ravel())
            dense = sd[p + "self_attn.o_proj.weight"].T[r * 32:(r + 1) * 32]
            assert np.array_equal(_file(folder, f"{p}attention.dense.weight.{r}.bin", dtype),
                                  _np(dense.contiguous(), dtype).ravel())
            for name in ("gate_proj", "up_proj"):
                w = sd[p + f"mlp.{name}.weight"].T[:, r * 96:(r + 1) * 96]
                assert np.array_equal(_file(folder, f"{p}mlp.{name}.weight.{r}.bin", dtype),
                                      _np(w.contiguous(), dtype).ravel())
            down = sd[p + "mlp.down_proj.weight"].T[r * 96:(r + 1) * 96]
            assert np.array_equal(_file(folder, f"{p}mlp.down_proj.weight.{r}.bin", dtype),
                                  _np(down.contiguous(), dtype).ravel())
        assert np.array_equal(_file(folder, f"{p}input_layernorm.weight.bin", dtype),
                              _np(sd[p + "input_layernorm.weight"], dtype))
    for name, src in (("model.wte.weight.bin", "model.embed_tokens.weight"),
                      ("model.lm_head.weight.bin", "lm_head.weight"),
                      ("model.final_layernorm.weight.bin", "model.norm.weight")):
        assert np.array_equal(_file(folder, name, dtype), _np(sd[src], dtype).ravel())


def test_qkv_mha_matches_pr575_converter_formula(store):
    """With kv heads == heads the layout is PR #575's: stack([q,k,v]).transpose(2,0,1), split on the last axis."""
    folder = store.checkpoint("mha", "ft", 4, 1) / "4-gpu"
    sd = store.hf("mha")
    for l in range(L):
        p = f"model.layers.{l}.self_attn."
        stacked = np.stack([sd[p + f"{x}_proj.weight"].numpy() for x in "qkv"]).transpose(2, 0, 1)  # [H, 3, H]
        for r, piece in enumerate(np.split(stacked, 4, axis=-1)):
            got = _file(folder, f"model.layers.{l}.attention.query_key_value.weight.{r}.bin", "fp32")
            assert np.array_equal(got, np.ascontiguousarray(piece).ravel())


def test_config_ini(store):
    ini = store.checkpoint("gqa", "ft", 2, 2, "fp16") / "2-gpu" / "config.ini"
    text = ini.read_text()
    cfg = configparser.ConfigParser()
    cfg.read_string(text)
    llama = dict(cfg["llama"])
    assert llama == {
        "model_name": "llama", "head_num": "8", "kv_head_num": "2", "size_per_head": "8", "inter_size": "192",
        "num_layer": "4", "rotary_embedding": "8", "layernorm_eps": "1e-05", "vocab_size": "512",
        "start_id": "0", "end_id": "1", "weight_data_type": "fp16", "rope_theta": "500000.0",
        "max_position_embeddings": "512", "tie_word_embeddings": "0", "llama3_rope_factor": "8.0",
        "llama3_rope_low_freq_factor": "1.0", "llama3_rope_high_freq_factor": "4.0",
        "llama3_rope_original_max_position_embeddings": "128"}
    assert dict(cfg["ft_instance_hyperparameter"]) == {
        "data_type": "fp16", "tensor_para_size": "2", "pipeline_para_size": "2", "int8_mode": "0",
        "model_name": "llama"}
    # PR #785 reads rope_scaling_factor as LINEAR scaling: writing llama3's factor there would be wrong.
    assert not any(cfg.has_option(section, "rope_scaling_factor") for section in cfg.sections())
    # INIReader's GetInteger is strtol(base 0): no leading zeros (octal); no inline comments after values.
    for key in ("head_num", "kv_head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "start_id",
                "end_id", "rotary_embedding"):
        assert re.fullmatch(r"0|[1-9]\d*", llama[key]), key
    assert all(";" not in line for line in text.splitlines() if "=" in line)


def test_pp_changes_no_weight_file(store):
    one = artifacts.read_manifest(store.checkpoint("gqa", "ft", 2, 1))
    two = artifacts.read_manifest(store.checkpoint("gqa", "ft", 2, 2))
    bins = lambda m: {e["path"]: e["sha256"] for e in m["files"] if e["path"].endswith(".bin")}  # noqa: E731
    assert bins(one) == bins(two) and len(bins(one)) == 3 + L * (2 + 5 * 2)


@pytest.mark.parametrize("model,tp,dtype", [("gqa", 1, "fp32"), ("gqa", 2, "fp32"), ("mha", 4, "fp32"),
                                            ("tied", 2, "fp32"), ("gqa", 2, "bf16"), ("mha", 2, "fp16")])
def test_round_trip_to_hf(store, model, tp, dtype):
    original = store.hf(model)
    args, state = hf.to_hf_state_dict("ft", store.checkpoint(model, "ft", tp, 1, dtype))
    assert set(state) == set(original)
    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, tensor in original.items():
        assert state[name].dtype == want
        assert torch.equal(state[name], tensor.to(want)), name  # bit for bit (after the cast)
    if model == "tied":
        assert args.tie_word_embeddings and "lm_head.weight" not in state


def test_write_hf_loads_in_transformers(store, tmp_path):
    from transformers import LlamaForCausalLM

    manifest = hf.write_hf("ft", store.checkpoint("gqa", "ft", 2, 1), tmp_path / "hf")
    assert {e["path"] for e in manifest["files"]} == {"config.json", "model.safetensors"}
    a = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    b = LlamaForCausalLM.from_pretrained(str(store.model("gqa")), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.rope_parameters == b.config.rope_parameters


def test_int8_mode_writes_the_same_files(store):
    """int8_mode=1 is quantized by FasterTransformer at load time: same .bin files, int8_mode recorded."""
    plain = artifacts.read_manifest(store.checkpoint("gqa", "ft", 2, 1, "fp16"))
    int8 = artifacts.read_manifest(store.checkpoint("gqa", "ft", 2, 1, "fp16", int8_mode=1))
    shas = lambda m: {e["path"]: e["sha256"] for e in m["files"] if e["path"].endswith(".bin")}  # noqa: E731
    assert shas(plain) == shas(int8)
    assert int8["int8_mode"] == 1
    _, info = ft.read_config(store.checkpoint("gqa", "ft", 2, 1, "fp16", int8_mode=1))
    assert info["int8_mode"] == 1 and info["compute_dtype"] == "fp16"


def test_weight_only_quantization_math():
    w = torch.randn(48, 64) * torch.linspace(0.01, 2, 48)[:, None]
    w[3] = 0.0  # an all-zero row must not divide by zero
    deq = ft.quantize_weight_only(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 128
    codes = (deq / torch.where(scale == 0, torch.ones_like(scale), scale))
    assert torch.allclose(codes, codes.round(), atol=1e-3)          # integers ...
    codes = codes.round()
    assert codes.min() >= -128 and codes.max() <= 127                 # ... in int8 range
    assert torch.all((deq - w).abs() <= scale * (1 + 1e-5))           # error at most one step
    assert torch.equal(deq[3], torch.zeros(64))
    assert not torch.equal(deq, w)


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, r"parallel.tp must divide model.num_heads=8; got 3"),
    ({"tp": 4}, r"parallel.tp must divide model.num_kv_heads=2 for FasterTransformer"),
    ({"tp": 1, "pp": 3}, r"parallel.pp must divide model.num_layers=4 for FasterTransformer"),
    ({"tp": 0}, r"parallel.tp must be an integer >= 1"),
    ({"tp": 1, "dtype": "int4"}, r"convert.dtype must be one of fp32, fp16, bf16"),
    ({"tp": 1, "dtype": "fp32", "int8_mode": 1}, r"int8_mode=1 needs convert.dtype fp16 or bf16"),
    ({"tp": 1, "dtype": "fp16", "int8_mode": 2}, r"convert.ft_int8_mode must be 0 or 1"),
])
def test_impossible_settings_raise_before_writing(tiny_model_dir, tmp_path, kwargs, match):
    out = tmp_path / "ft"
    with pytest.raises(PipelineError, match=match) as info:
        ft.convert(tiny_model_dir, out, **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no output, no .partial


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_bin_detected_before_loading(store, tmp_path):
    ckpt = _copy(store.checkpoint("gqa", "ft", 2, 1), tmp_path / "ckpt")
    victim = ckpt / "2-gpu" / "model.layers.1.mlp.down_proj.weight.1.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    for m in Mapping(2, 1).all_ranks():  # sizes of all files are checked on every rank
        with pytest.raises(PipelineError, match=r"down_proj.weight.1.bin: size 24572 != 24576 .*truncated"):
            ft.read_rank(ckpt, m)
    with pytest.raises(PipelineError, match="truncated"):
        hf.to_hf_state_dict("ft", ckpt)


def test_corrupt_bin_detected_by_the_rank_that_reads_it(store, tmp_path):
    ckpt = _copy(store.checkpoint("gqa", "ft", 2, 1), tmp_path / "ckpt")
    victim = ckpt / "2-gpu" / "model.layers.2.attention.query_key_value.weight.1.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    ft.read_rank(ckpt, Mapping(2, 1, rank=0))  # rank 0 never reads the .1 file
    with pytest.raises(PipelineError, match=r"query_key_value.weight.1.bin: sha256 differs"):
        ft.read_rank(ckpt, Mapping(2, 1, rank=1))


def _rewrite(ckpt, edit):
    """Change the checkpoint and re-issue its manifest (as a buggy converter would): only the readers'
    own checks remain."""
    manifest = artifacts.read_manifest(ckpt)
    edit(ckpt)
    extra = {k: v for k, v in manifest.items() if k not in ("files", "created_unix")}
    artifacts.write_manifest(ckpt, **extra)


def test_missing_config_key(store, tmp_path):
    ckpt = _copy(store.checkpoint("gqa", "ft", 2, 1), tmp_path / "ckpt")
    ini = ckpt / "2-gpu" / "config.ini"
    _rewrite(ckpt, lambda _: ini.write_text(re.sub(r"(?m)^kv_head_num = .*\n", "", ini.read_text())))
    with pytest.raises(PipelineError, match=r"config.ini: \[llama\] kv_head_num is missing"):
        ft.read_rank(ckpt, Mapping(2, 1))


def test_leftover_file_raises(store, tmp_path):
    ckpt = _copy(store.checkpoint("gqa", "ft", 1, 1), tmp_path / "ckpt")
    _rewrite(ckpt, lambda c: (c / "1-gpu" / "model.layers.0.attention.query_key_value.bias.0.bin").write_bytes(b"\0" * 4))
    with pytest.raises(PipelineError, match=r"query_key_value.bias.0.bin: not a file of this layout"):
        ft.read_rank(ckpt, Mapping(1, 1))


def test_runner_tp_must_match_folder(store):
    with pytest.raises(PipelineError, match=r"converted for tp=2; the runner was started with tp=1"):
        ft.read_rank(store.checkpoint("gqa", "ft", 2, 1), Mapping(1, 1))


def test_missing_hf_config_key_and_leftover_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(tiny_model_dir, tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "num_attention_heads"}))
    with pytest.raises(PipelineError, match=r"config.json: required key 'num_attention_heads' is missing"):
        ft.convert(src, tmp_path / "out", tp=1)
    (src / "config.json").write_text(json.dumps(raw))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"'model.layers.0.self_attn.q_proj.bias' has no FasterTransformer name"):
        ft.convert(src, tmp_path / "out", tp=1)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_previous_output(tiny_model_dir, tmp_path, monkeypatch):
    from pipeline.convert.common import HFCheckpoint

    out = tmp_path / "ft"
    ft.convert(tiny_model_dir, out, tp=1, dtype="fp32")
    before = artifacts.read_manifest(out)
    real_get = HFCheckpoint.get

    def failing_get(self, name):
        if name.startswith("model.layers.2."):
            raise PipelineError(f"{name}: simulated read failure")
        return real_get(self, name)

    monkeypatch.setattr(HFCheckpoint, "get", failing_get)
    with pytest.raises(PipelineError, match="simulated read failure"):
        ft.convert(tiny_model_dir, out, tp=2, dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no ft.partial left behind
    assert artifacts.verify_manifest(out)["files"] == before["files"]  # the old checkpoint is intact
