"""FasterTransformer LLaMA checkpoint: `<tp>-gpu/config.ini` + raw little-endian `.bin` tensors.

Layout of NVIDIA/FasterTransformer pull request #575 (examples/cpp/llama, llama_ckpt_convert.py), extended for
GQA as pull request #785 reads it (kv_head_num, per-rank [H, (heads + 2*kv_heads)*d/tp] QKV):
  model.wte.weight.bin / model.lm_head.weight.bin           [V, H]     full on every rank, never split
  model.final_layernorm.weight.bin, layer norms             [H]        no rank suffix
  model.layers.{l}.attention.query_key_value.weight.{r}.bin [H, (nq + 2*nkv)*d/tp] = concat(q_r, k_r, v_r).T
  model.layers.{l}.attention.dense.weight.{r}.bin           [H/tp, H]  o_proj.T, split rows
  model.layers.{l}.mlp.{gate,up}_proj.weight.{r}.bin        [H, I/tp]  .T, split columns
  model.layers.{l}.mlp.down_proj.weight.{r}.bin             [I/tp, H]  .T, split rows
No file depends on PP: every PP rank reads the same folder and loads layers [p*L/pp, (p+1)*L/pp).
int8_mode=1 (weight-only) changes no file: FasterTransformer quantizes the float files at load time.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.convert.common import HFCheckpoint, check_dtype, verify_files
from pipeline.convert.shards import shard
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.model.hf_tensors import Q, TENSORS, local_shape, template
from pipeline.parallel.mapping import Mapping, check_layout

# HF name -> FasterTransformer file stem ("{}" = global layer index). None: fused into QKV below.
FT_NAMES = {
    "model.embed_tokens.weight": "model.wte.weight",
    "model.norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "model.lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": None,
    "model.layers.{}.self_attn.k_proj.weight": None,
    "model.layers.{}.self_attn.v_proj.weight": None,
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attention.dense.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
}
QKV = "model.layers.{}.attention.query_key_value.weight"
K, V = (f"model.layers.{{}}.self_attn.{x}_proj.weight" for x in "kv")
# Layer linears are transposed to [in, out] and split per rank (.{r}.bin); wte, lm_head, norms are whole.
PER_RANK = {t for t, spec in TENSORS.items() if spec.split is not None and t != "lm_head.weight"}
NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}  # bf16: raw bits
SECTION = "llama"
RUN_SECTION = "ft_instance_hyperparameter"
LLAMA3_KEYS = {  # our own keys: no FasterTransformer build implements llama3 RoPE scaling
    "llama3_rope_factor": "factor",
    "llama3_rope_low_freq_factor": "low_freq_factor",
    "llama3_rope_high_freq_factor": "high_freq_factor",
    "llama3_rope_original_max_position_embeddings": "original_max_position_embeddings",
}


def convert(model_dir: Path, out_dir: Path, *, tp: int, pp: int = 1, dtype: str = "fp16", int8_mode: int = 0,
            model_name: str = "llama") -> dict[str, Any]:
    """Write `out_dir/<tp>-gpu/` (+ manifest.json in out_dir) atomically; return the manifest."""
    from pipeline.progress import progress_bar  # rich: imported by converters only, not by the runner
    from pipeline.versions import library_versions

    src = HFCheckpoint(model_dir)
    args = src.args
    torch_dtype = check_dtype(dtype)
    _check_supported(args, tp, pp, dtype, int8_mode, src.dir / "config.json")
    src.check_names("FasterTransformer")
    out_dir = Path(out_dir)
    with artifacts.atomic_dir(out_dir) as tmp:
        folder = tmp / f"{tp}-gpu"
        folder.mkdir()
        (folder / "config.ini").write_text(_config_ini(args, tp, pp, dtype, int8_mode, model_name))
        with progress_bar(f"FasterTransformer {tp}-gpu ({dtype})", total=args.num_layers + 1) as advance:
            for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                source = "model.embed_tokens.weight" if name == "lm_head.weight" and args.tie_word_embeddings else name
                _write(src.get(source).to(torch_dtype), folder / f"{FT_NAMES[name]}.bin")  # lm_head even if tied
            advance()
            for layer in range(args.num_layers):
                _convert_layer(src, args, layer, tp, torch_dtype, folder)
                advance()
        return artifacts.write_manifest(
            tmp, kind="ft-checkpoint", format="ft", folder=folder.name, tp=tp, pp=pp, dtype=dtype,
            int8_mode=int8_mode, model=args.to_dict(), **src.lineage(), versions=library_versions())


def _convert_layer(src: HFCheckpoint, args: LlamaArgs, layer: int, tp: int, dtype: torch.dtype,
                   folder: Path) -> None:
    # Look up, transform, write; q/k/v (None in FT_NAMES) are fused per rank after the loop.
    qkv = {}
    for tmpl, stem in FT_NAMES.items():
        if "{}" not in tmpl:
            continue
        w = src.get(tmpl.format(layer)).to(dtype)
        if stem is None:
            qkv[tmpl] = w
        elif tmpl in PER_RANK:
            for r in range(tp):
                _write(shard(tmpl, w, args, tp, r).T, folder / f"{stem.format(layer)}.{r}.bin")
        else:
            _write(w, folder / f"{stem.format(layer)}.bin")
    for r in range(tp):
        fused = torch.cat([shard(t, qkv[t], args, tp, r) for t in (Q, K, V)], dim=0)  # [q_r | k_r | v_r]
        _write(fused.T, folder / f"{QKV.format(layer)}.{r}.bin")


def _check_supported(args: LlamaArgs, tp: int, pp: int, dtype: str, int8_mode: int, source: Path) -> None:
    check_layout(tp, pp, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, num_layers=args.num_layers,
                 intermediate_size=args.intermediate_size, formats=["ft"])
    if args.head_dim * args.num_heads != args.hidden_size:
        raise PipelineError(f"{source}: head_dim={args.head_dim} != hidden_size/num_attention_heads; "
                            f"FasterTransformer derives size_per_head from hidden_size")
    if int8_mode not in (0, 1):
        raise PipelineError(f"convert.ft_int8_mode must be 0 or 1 (weight-only); got {int8_mode!r}")
    if int8_mode == 1 and dtype == "fp32":
        raise PipelineError("convert.ft_int8_mode=1 needs convert.dtype fp16 or bf16: FasterTransformer rejects "
                            "int8 weight-only with fp32 compute")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(args, key) is None:
            raise PipelineError(f"{source}: '{key}' is missing; FasterTransformer's config.ini needs it "
                                f"(start_id/end_id)")


def _config_ini(args: LlamaArgs, tp: int, pp: int, dtype: str, int8_mode: int, model_name: str) -> str:
    # FT reads model hyper-parameters from [llama] and run settings from [ft_instance_hyperparameter];
    # INIReader ignores keys it does not know, so our extra keys are harmless.
    run = {"data_type": dtype, "tensor_para_size": tp, "pipeline_para_size": pp, "int8_mode": int8_mode,
           "model_name": model_name}
    llama = {"model_name": model_name, "head_num": args.num_heads, "kv_head_num": args.num_kv_heads,
             "size_per_head": args.head_dim, "inter_size": args.intermediate_size, "num_layer": args.num_layers,
             "rotary_embedding": args.head_dim, "layernorm_eps": args.rms_norm_eps, "vocab_size": args.vocab_size,
             "start_id": args.bos_token_id, "end_id": args.eos_token_id, "weight_data_type": dtype,
             "rope_theta": args.rope_theta}
    ours = {"max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": int(args.tie_word_embeddings)}
    if args.rope_scaling:
        ours.update({key: args.rope_scaling[hf] for key, hf in LLAMA3_KEYS.items()})
    lines = ["; written by pipeline.convert.ft (PR #575 layout, GQA per PR #785)", f"[{RUN_SECTION}]"]
    lines += [f"{k} = {v}" for k, v in run.items()]
    lines += ["", f"[{SECTION}]"] + [f"{k} = {v}" for k, v in llama.items()]
    lines += ["; not read by FasterTransformer: llama3 RoPE scaling (no FT build implements it; PR #785's",
              "; rope_scaling_factor is linear and deliberately not written), model length, tied embeddings"]
    lines += [f"{k} = {v}" for k, v in ours.items()]
    return "\n".join(lines) + "\n"


def _write(t: torch.Tensor, path: Path) -> None:
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    path.write_bytes(raw.numpy().tobytes())


def _read(path: Path, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    data = np.fromfile(path, dtype=NUMPY[dtype])
    if data.size != int(np.prod(shape)):
        raise PipelineError(f"{path}: {data.size} elements, expected {shape} ({dtype}); reconvert the checkpoint")
    t = torch.from_numpy(data).reshape(shape)
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def find_folder(ckpt_dir: Path) -> Path:
    folders = sorted(p for p in Path(ckpt_dir).glob("*-gpu") if p.is_dir())
    if len(folders) != 1:
        raise PipelineError(f"{ckpt_dir}: expected exactly one <tp>-gpu/ folder, found {len(folders)}")
    return folders[0]


def read_config(ckpt_dir: Path) -> tuple[LlamaArgs, dict[str, Any]]:
    """config.ini -> (LlamaArgs, {tp, pp, dtype, int8_mode, folder})."""
    folder = find_folder(ckpt_dir)
    path = folder / "config.ini"
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text())
    except (OSError, configparser.Error) as e:
        raise PipelineError(f"{path}: unreadable ({str(e).splitlines()[0]}); reconvert the checkpoint") from None

    def get(section: str, key: str, cast):
        if not parser.has_option(section, key):
            raise PipelineError(f"{path}: [{section}] {key} is missing; reconvert the checkpoint")
        try:
            return cast(parser.get(section, key))
        except ValueError:
            raise PipelineError(f"{path}: [{section}] {key} = {parser.get(section, key)!r} is not a {cast.__name__}")

    scaling = None
    if any(parser.has_option(SECTION, k) for k in LLAMA3_KEYS):
        scaling = {hf: get(SECTION, k, int if hf.startswith("original") else float) for k, hf in LLAMA3_KEYS.items()}
    heads, head_dim = get(SECTION, "head_num", int), get(SECTION, "size_per_head", int)
    args = LlamaArgs(
        vocab_size=get(SECTION, "vocab_size", int), hidden_size=heads * head_dim,
        intermediate_size=get(SECTION, "inter_size", int), num_layers=get(SECTION, "num_layer", int),
        num_heads=heads, num_kv_heads=get(SECTION, "kv_head_num", int),
        head_dim=head_dim, rms_norm_eps=get(SECTION, "layernorm_eps", float),
        rope_theta=get(SECTION, "rope_theta", float), rope_scaling=scaling,
        max_position_embeddings=get(SECTION, "max_position_embeddings", int),
        tie_word_embeddings=bool(get(SECTION, "tie_word_embeddings", int)),
        bos_token_id=get(SECTION, "start_id", int), eos_token_id=get(SECTION, "end_id", int))
    dtype = get(SECTION, "weight_data_type", str)
    if dtype not in NUMPY:
        raise PipelineError(f"{path}: [llama] weight_data_type must be one of {', '.join(NUMPY)}; got {dtype!r}")
    info = {"tp": get(RUN_SECTION, "tensor_para_size", int), "pp": get(RUN_SECTION, "pipeline_para_size", int),
            "dtype": dtype, "compute_dtype": get(RUN_SECTION, "data_type", str),
            "int8_mode": get(RUN_SECTION, "int8_mode", int), "folder": folder}
    if folder.name != f"{info['tp']}-gpu":
        raise PipelineError(f"{path}: tensor_para_size={info['tp']} but the folder is {folder.name}/")
    return args, info


def expected_files(args: LlamaArgs, tp: int) -> list[str]:
    files = ["config.ini"] + [f"{FT_NAMES[n]}.bin" for n in ("model.embed_tokens.weight", "model.norm.weight",
                                                              "lm_head.weight")]
    for layer in range(args.num_layers):
        for tmpl, stem in FT_NAMES.items():
            stem = QKV if tmpl == Q else stem  # k and v live in the same fused file
            if "{}" not in tmpl or stem is None:
                continue
            if tmpl in PER_RANK:
                files += [f"{stem.format(layer)}.{r}.bin" for r in range(tp)]
            else:
                files.append(f"{stem.format(layer)}.bin")
    return files


def read_rank(ckpt_dir: Path, mapping: Mapping) -> tuple[LlamaArgs, dict[str, Any], dict[str, torch.Tensor]]:
    """What one (tp_rank, pp stage) needs, as HF-named shards in HF orientation ([out, in]); only its own
    layers, the embedding on the first stage, norm + its lm_head rows on the last."""
    args, info = read_config(ckpt_dir)
    folder, dtype, tp, r = info["folder"], info["dtype"], info["tp"], mapping.tp_rank
    if mapping.tp != tp:
        raise PipelineError(f"{folder}: converted for tp={tp}; the runner was started with tp={mapping.tp}")
    layers = mapping.layers(args.num_layers, "ft")
    expected = expected_files(args, tp)
    leftover = sorted({p.name for p in folder.iterdir()} - set(expected))
    if leftover:
        raise PipelineError(f"{folder / leftover[0]}: not a file of this layout (no HF name maps to it)")
    needed = [f for f in expected if _rank_needs(f, mapping, layers)]
    verify_files(ckpt_dir, [f"{folder.name}/{f}" for f in needed])
    h, d = args.hidden_size, args.head_dim
    nq, nkv = args.num_heads // tp, args.num_kv_heads // tp
    out: dict[str, torch.Tensor] = {}
    if mapping.is_first_stage:
        out["model.embed_tokens.weight"] = _read(folder / "model.wte.weight.bin", dtype, (args.vocab_size, h))
    if mapping.is_last_stage:
        out["model.norm.weight"] = _read(folder / "model.final_layernorm.weight.bin", dtype, (h,))
        lm = _read(folder / "model.lm_head.weight.bin", dtype, (args.vocab_size, h))
        out["lm_head.weight"] = shard("lm_head.weight", lm, args, tp, r)  # FT pads and slices at load time
    for layer in layers:
        for tmpl, stem in FT_NAMES.items():
            if "{}" not in tmpl or stem is None:
                continue
            if tmpl in PER_RANK:
                disk_shape = local_shape(tmpl, args, tp)[::-1]  # transposed: [in, out]
                out[tmpl.format(layer)] = _read(folder / f"{stem.format(layer)}.{r}.bin", dtype, disk_shape).T
            else:
                out[tmpl.format(layer)] = _read(folder / f"{stem.format(layer)}.bin", dtype, (h,))
        fused = _read(folder / f"{QKV.format(layer)}.{r}.bin", dtype, (h, (nq + 2 * nkv) * d)).T
        for tmpl, part in zip((Q, K, V), fused.split([nq * d, nkv * d, nkv * d], dim=0)):
            out[tmpl.format(layer)] = part
    return args, info, {k: v.contiguous() for k, v in out.items()}


def _rank_needs(file: str, mapping: Mapping, layers: range) -> bool:
    if file == "config.ini":
        return True
    if file == "model.wte.weight.bin":
        return mapping.is_first_stage
    if file in ("model.final_layernorm.weight.bin", "model.lm_head.weight.bin"):
        return mapping.is_last_stage
    tmpl, layer = template(file)
    rank_suffix = file.rsplit(".", 2)[-2]
    return layer in layers and (not rank_suffix.isdigit() or int(rank_suffix) == mapping.tp_rank)


# Quantized by int8_mode=1: QKV, dense, gate, up, down. Norms, wte and lm_head stay floating point.
INT8_LINEARS = PER_RANK


def quantize_weight_only(w: torch.Tensor) -> torch.Tensor:
    """FasterTransformer int8_mode=1 at load time, emulated: per output feature (a row of [out, in]; a
    column of FT's [in, out] file) scale = absmax/128, int8 = clamp(round(w/scale), -128, 127).
    Returns the dequantized weight in w's dtype: the values FT's int8 GEMM multiplies by."""
    wf = w.float()
    scale = wf.abs().amax(dim=1, keepdim=True) / 128.0
    q = torch.clamp(torch.round(wf / torch.where(scale == 0, torch.ones_like(scale), scale)), -128, 127)
    return (q * scale.to(w.dtype).float()).to(w.dtype)

