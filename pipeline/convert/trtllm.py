"""TensorRT-LLM checkpoint (TensorRT-engine backend, <= 1.2): `config.json` + `rank{r}.safetensors`.

rank = pp_rank * tp + tp_rank. Per rank file (TensorRT-LLM tensorrt_llm/models/llama/convert.py and
models/convert_utils.py: names, QKV fusion, KV-head replication, vocab padding), linears stay [out, in]:
  transformer.vocab_embedding.weight   [V, H]                     first PP stage only, on every TP rank
  transformer.layers.{j}.attention.qkv.weight  [(nq/tp + 2*kv_l)*d, H] = cat(q_r, k_r, v_r); kv_l = max(nkv/tp, 1)
  transformer.layers.{j}.attention.dense.weight [H, nq*d/tp]      split dim 1
  transformer.layers.{j}.mlp.fc / mlp.gate     [I/tp, H]          fc = HF gate_proj, gate = HF up_proj
  transformer.layers.{j}.mlp.proj.weight       [H, I/tp]          split dim 1
  transformer.ln_f.weight [H], lm_head.weight [ceil(V/tp), H]     last PP stage only; lm_head zero-padded
j is the LOCAL layer index inside the stage (global l = stage start + j). No RoPE tables are written, so
the engine computes RoPE from rotary_base / rotary_scaling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import artifacts
from pipeline.convert.common import HFCheckpoint, check_dtype, verify_files
from pipeline.convert.shards import shard
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.model.hf_tensors import Q, K, V, local_shape, template
from pipeline.parallel.mapping import Mapping, check_layout
from pipeline.precision import BY_LONG_NAME, PRECISIONS

# HF name -> TensorRT-LLM name ("{}" = layer index, local to the PP stage). None: fused into QKV below.
TRTLLM_NAMES = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": None,
    "model.layers.{}.self_attn.k_proj.weight": None,
    "model.layers.{}.self_attn.v_proj.weight": None,
    "model.layers.{}.self_attn.o_proj.weight": "transformer.layers.{}.attention.dense.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.layers.{}.post_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "transformer.layers.{}.mlp.fc.weight",  # activated branch
    "model.layers.{}.mlp.up_proj.weight": "transformer.layers.{}.mlp.gate.weight",  # the multiplier
    "model.layers.{}.mlp.down_proj.weight": "transformer.layers.{}.mlp.proj.weight",
}
QKV = "transformer.layers.{}.attention.qkv.weight"
QUANT_ALGOS = (None, "W8A16")
W8A16_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")  # not embedding/lm_head/norms


def convert(model_dir: Path, out_dir: Path, *, tp: int, pp: int = 1, dtype: str = "fp16",
            quant: Optional[str] = None) -> dict[str, Any]:
    """Write config.json + rank{r}.safetensors (+ manifest.json) into out_dir atomically; return the manifest."""
    from safetensors.torch import save_file

    from pipeline.progress import progress_bar  # rich: imported by converters only, not by the runner
    from pipeline.versions import library_versions

    src = HFCheckpoint(model_dir)
    args = src.args
    torch_dtype = check_dtype(dtype)
    check_layout(tp, pp, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, num_layers=args.num_layers,
                 intermediate_size=args.intermediate_size, formats=["trtllm"])
    if quant not in QUANT_ALGOS:
        raise PipelineError(f"convert.trtllm_quant must be null or W8A16; got {quant!r}")
    quantize = _w8a16_op() if quant == "W8A16" else None  # fails before any output if TensorRT-LLM is absent
    src.check_names("TensorRT-LLM")
    world = Mapping(tp, pp)
    with artifacts.atomic_dir(Path(out_dir)) as tmp:
        artifacts.atomic_write_json(tmp / "config.json", _config(args, tp, pp, dtype, quant))
        with progress_bar(f"TensorRT-LLM tp{tp} pp{pp} ({dtype})", total=world.world_size) as advance:
            for m in world.all_ranks():
                tensors = _rank_tensors(src, args, m, torch_dtype)
                if quantize is not None:
                    tensors = _apply_w8a16(tensors, quantize)
                save_file(tensors, str(tmp / f"rank{m.rank}.safetensors"), metadata={"format": "pt"})
                advance()
        return artifacts.write_manifest(
            tmp, kind="trtllm-checkpoint", format="trtllm", tp=tp, pp=pp, dtype=dtype, quant_algo=quant,
            mapping=world.to_dict(), model=args.to_dict(), **src.lineage(), versions=library_versions())


def _rank_tensors(src: HFCheckpoint, args: LlamaArgs, m: Mapping, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    globals_ = ["model.embed_tokens.weight"] if m.is_first_stage else []
    globals_ += ["model.norm.weight", "lm_head.weight"] if m.is_last_stage else []
    for name in globals_:
        source = "model.embed_tokens.weight" if name == "lm_head.weight" and args.tie_word_embeddings else name
        out[TRTLLM_NAMES[name]] = shard(name, src.get(source).to(dtype), args, m.tp, m.tp_rank)
    for j, layer in enumerate(m.layers(args.num_layers)):
        qkv = []
        for tmpl, target in TRTLLM_NAMES.items():
            if "{}" not in tmpl:
                continue
            piece = shard(tmpl, src.get(tmpl.format(layer)).to(dtype), args, m.tp, m.tp_rank)
            if target is None:
                qkv.append(piece)  # Q, K, V in dict order
            else:
                out[target.format(j)] = piece
        out[QKV.format(j)] = torch.cat(qkv, dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def _config(args: LlamaArgs, tp: int, pp: int, dtype: str, quant: Optional[str]) -> dict[str, Any]:
    scaling = None
    if args.rope_scaling:
        # Both keys: TensorRT-LLM's own converter copies HF's `rope_type`; older trtllm-build reads `type`.
        scaling = {"type": "llama3", "rope_type": "llama3", **args.rope_scaling}
    return {
        "architecture": "LlamaForCausalLM", "dtype": PRECISIONS[dtype].long_name, "logits_dtype": "float32",
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads, "num_key_value_heads": args.num_kv_heads,
        "head_size": args.head_dim, "intermediate_size": args.intermediate_size,
        "max_position_embeddings": args.max_position_embeddings, "hidden_act": "silu",
        "norm_epsilon": args.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
        "rotary_base": args.rope_theta, "rotary_scaling": scaling,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "tie_word_embeddings": args.tie_word_embeddings, "mlp_bias": False, "attn_bias": False,
        "qk_layernorm": False,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "cp_size": 1, "moe_tp_size": tp,
                    "moe_ep_size": 1, "gpus_per_node": 8},
        "quantization": {"quant_algo": quant, "kv_cache_quant_algo": None},
    }


def _w8a16_op():
    """TensorRT-LLM's weight-only quantizer: its int8 layout is interleaved for the converting GPU's CUTLASS
    kernels, so only TensorRT-LLM itself can write it (its llama/convert.py get_tllm_linear_weight calls
    torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix)."""
    try:
        import tensorrt_llm  # noqa: F401  (registers torch.ops.trtllm)
    except ImportError:
        raise PipelineError("convert.trtllm_quant=W8A16 needs the tensorrt_llm package (pip install "
                            "'.[trtllm]' on the GPU you will build for); its int8 layout is GPU-specific") from None
    return torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix


def _apply_w8a16(tensors: dict[str, torch.Tensor], quantize) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and any(f".{lin}.weight" in name for lin in W8A16_LINEARS):
            # [out, in] -> [in, out], then int8 + per-output-channel scale in the model dtype.
            qweight, scale = quantize(w.t().contiguous(), torch.int8)
            out[name] = qweight
            out[name.replace(".weight", ".per_channel_scale")] = scale
        else:
            out[name] = w
    return out


REQUIRED = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_size", "intermediate_size", "max_position_embeddings", "norm_epsilon",
            "rotary_base", "mapping", "quantization")


def read_config(ckpt_dir: Path) -> tuple[LlamaArgs, dict[str, Any]]:
    """config.json -> (LlamaArgs, {tp, pp, dtype, quant_algo})."""
    path = Path(ckpt_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: unreadable ({e}); reconvert the checkpoint") from None
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise PipelineError(f"{path}: required key '{missing[0]}' is missing; reconvert the checkpoint")
    if raw["architecture"] != "LlamaForCausalLM":
        raise PipelineError(f"{path}: architecture is {raw['architecture']!r}, expected LlamaForCausalLM")
    dtypes = BY_LONG_NAME
    if raw["dtype"] not in dtypes:
        raise PipelineError(f"{path}: dtype must be one of {', '.join(dtypes)}; got {raw['dtype']!r}")
    scaling = raw.get("rotary_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise PipelineError(f"{path}: rotary_scaling type {kind!r} is not supported (only llama3)")
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")}
    args = LlamaArgs(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"], head_dim=raw["head_size"], rms_norm_eps=raw["norm_epsilon"],
        rope_theta=float(raw["rotary_base"]), max_position_embeddings=raw["max_position_embeddings"],
        rope_scaling=scaling or None, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    mapping = raw["mapping"]
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if mapping.get("world_size", tp * pp) != tp * pp:
        raise PipelineError(f"{path}: mapping.world_size={mapping.get('world_size')} != tp_size*pp_size={tp * pp}")
    return args, {"tp": tp, "pp": pp, "dtype": dtypes[raw["dtype"]],
                  "quant_algo": raw["quantization"].get("quant_algo")}


def read_rank(ckpt_dir: Path, mapping: Mapping) -> tuple[LlamaArgs, dict[str, Any], dict[str, torch.Tensor]]:
    """rank{r}.safetensors as HF-named shards in HF orientation, with global layer indices."""
    from safetensors import SafetensorError, safe_open

    args, info = read_config(ckpt_dir)
    path = Path(ckpt_dir) / f"rank{mapping.rank}.safetensors"
    if (mapping.tp, mapping.pp) != (info["tp"], info["pp"]):
        raise PipelineError(f"{ckpt_dir}: converted for tp={info['tp']} pp={info['pp']}; the runner was started "
                            f"with tp={mapping.tp} pp={mapping.pp}")
    if info["quant_algo"] is not None:
        raise PipelineError(f"{ckpt_dir}/config.json: quant_algo={info['quant_algo']} has a GPU-specific int8 "
                            f"layout; the torch runner loads only unquantized checkpoints")
    verify_files(ckpt_dir, ["config.json", path.name])
    layers = mapping.layers(args.num_layers)
    expected = {}  # TensorRT-LLM name -> HF name (global layer index)
    if mapping.is_first_stage:
        expected["transformer.vocab_embedding.weight"] = "model.embed_tokens.weight"
    if mapping.is_last_stage:
        expected.update({"transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"})
    for j, layer in enumerate(layers):
        expected[QKV.format(j)] = None  # fused q/k/v: split below
        for tmpl, target in TRTLLM_NAMES.items():
            if "{}" in tmpl and target is not None:
                expected[target.format(j)] = tmpl.format(layer)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            leftover = sorted(names - set(expected))
            if leftover:
                raise PipelineError(f"{path}: tensor '{leftover[0]}' has no HF name ({len(leftover)} unmapped)")
            missing = sorted(set(expected) - names)
            if missing:
                raise PipelineError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing)")
            raw = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{path}: unreadable safetensors ({e}); reconvert the checkpoint") from None
    d, nq, nkv = args.head_dim, args.num_heads // mapping.tp, max(args.num_kv_heads // mapping.tp, 1)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if expected[name] is None:
            _check_shape(path, name, tensor, ((nq + 2 * nkv) * d, args.hidden_size))
            layer = layers[template(name)[1]]
            for tmpl, part in zip((Q, K, V), tensor.split([nq * d, nkv * d, nkv * d], dim=0)):
                out[tmpl.format(layer)] = part.contiguous()
        else:
            _check_shape(path, name, tensor, local_shape(template(expected[name])[0], args, mapping.tp))
            out[expected[name]] = tensor
    return args, info, out


def _check_shape(path: Path, name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(want):
        raise PipelineError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(want)}; reconvert")
