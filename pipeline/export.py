"""Hugging Face Llama -> ONNX decoder with KV cache (the interface in pipeline/onnx_io.py), checked
against the torch reference.

Exported with `torch.onnx.export(dynamo=True)` around a wrapper with flat past/present tensors
(optimum's exporter requires transformers < 4.58, so it cannot export with transformers 5).

The artifact is the same bytes in every checkout: the exporter records each node's Python stack
(absolute paths of the checkout and the Python environment, and line numbers of this file) as node
metadata, which is stripped before the graph is checked, and the manifest names the source weights by
their manifest's sha256, not by path. So a second clone or a queued DVC experiment reproduces
artifacts/onnx exactly, and DVC does not rerun the stages below it."""

from __future__ import annotations

import os
import site
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.model.hf import has_tokenizer, load_hf_model, load_tokenizer, random_token_ids
from pipeline.onnx_io import (MODEL_FILE, ORT_LEVELS, count_ops, empty_past_feeds, input_names, ort_session,
                              output_names, position_ids)
from pipeline.versions import library_versions

MIN_OPSET = 18  # torchlib's minimum for the dynamo exporter
# protobuf refuses messages over 2 GiB; leave room for the graph itself next to the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Metadata whose values name files on the exporting machine: the dynamo exporter's per-node Python
# stack ("File \"/abs/path/modeling_llama.py\", line 123 ..."). Anything else that mentions a local
# directory (_local_roots) is dropped too, so a future exporter's new path-bearing key cannot slip in.
PATH_METADATA_KEYS = frozenset({"pkg.torch.onnx.stack_trace"})
# Parity prompts of different lengths, so the batch is left-padded and the padding path is checked too.
PARITY_PROMPTS = (
    "The ferry left the island twice a day.",
    "A lighthouse keeper wrote down the weather every morning, even when nothing had changed.",
    "Rain again.",
)
# Without a tokenizer (random-weight presets of the real shapes), parity runs on seeded random ids of
# roughly the lengths the prompts above tokenize to with Llama 3's tokenizer, again left-padded.
PARITY_RANDOM_LENGTHS = (11, 19, 4)
PARITY_SEED = 0


class _FlatKV(torch.nn.Module):
    """Flat tensors in and out, so the ONNX graph has one named input/output per layer and K/V."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])


def _torch_export(model, path: Path, opset: int, external: bool) -> None:
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    max_pos = int(cfg.max_position_embeddings)
    dim = torch.export.Dim
    # Example sizes >= 2 in every dynamic dim: torch.export specialises dims whose example is 0 or 1.
    batch, seq, past_seq = dim("batch", min=1), dim("seq", min=1, max=max_pos), dim("past_seq", min=0, max=max_pos)
    b, s, p = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype  # the past K/V are in the graph's float type
    past = tuple(torch.randn(b, cfg.num_key_value_heads, p, head_dim, generator=gen).to(dtype)
                 for _ in range(2 * n_layers))
    kv_spec = {0: batch, 2: past_seq}
    total_seq = dim("total_seq", min=1, max=2 * max_pos)  # attention_mask covers past_seq + seq
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total_seq}, {0: batch, 1: seq},
                      tuple([kv_spec] * (2 * n_layers)))  # the *past varargs take ONE tuple entry
    try:
        torch.onnx.export(_FlatKV(model).eval(), (ids, mask, pos, *past), str(path), dynamo=True,
                          input_names=input_names(n_layers), output_names=output_names(n_layers),
                          dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=external,
                          optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; the first line is what the user needs
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PipelineError(f"{path.name}: torch.onnx.export (dynamo) failed for this model "
                            f"({type(e).__name__}: {first})") from e


def _export_checked(model, path: Path, opset: int, external: bool, roots: Sequence[str]) -> None:
    """Export, strip what names this machine, and let onnx.checker validate the file."""
    import onnx

    _torch_export(model, path, opset, external)
    _strip_local_paths_in_file(path, roots)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB
    except Exception as e:
        raise PipelineError(f"{path.name}: onnx.checker rejected the exported graph "
                            f"({str(e).splitlines()[0]})") from e


def _local_roots(*dirs: Path) -> list[str]:
    """Absolute directories of this machine that must not appear in an artifact: the checkout (and the
    working directory), the Python environment, the home directory, and `dirs` (source and output)."""
    # getsitepackages is missing from old virtualenvs' site module
    site_dirs = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    candidates = [Path.cwd(), Path(__file__).resolve().parents[1], Path(os.path.expanduser("~")), Path(sys.prefix),
                  Path(sys.base_prefix), Path(sys.exec_prefix), *map(Path, site_dirs), *map(Path, dirs)]
    roots = set()
    for c in candidates:
        for form in (c, c.resolve()):
            if form.is_absolute() and len(form.parts) > 1:  # never "/" itself: every path contains it
                roots.add(str(form))
    return sorted(roots)


def strip_local_paths(model, roots: Iterable[str]) -> int:
    """Remove, in place, what names files on this machine from an onnx.ModelProto: metadata entries with
    a PATH_METADATA_KEYS key, or whose value contains one of `roots`, and doc_strings containing a root.
    Covers the model, every graph and subgraph (If/Loop/Scan bodies), node, value info, initializer and
    function. Returns how many entries were removed."""
    import onnx

    roots = tuple(roots)

    def local(text: str) -> bool:
        return any(r in text for r in roots)

    def clean(holder) -> int:  # every proto walked here has metadata_props and doc_string
        drop = [i for i, p in enumerate(holder.metadata_props) if p.key in PATH_METADATA_KEYS or local(p.value)]
        for i in reversed(drop):
            del holder.metadata_props[i]
        if holder.doc_string and local(holder.doc_string):
            holder.doc_string = ""
            return len(drop) + 1
        return len(drop)

    def nodes(node_list) -> int:
        removed = 0
        for node in node_list:
            removed += clean(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    removed += graph(attr.g)
                removed += sum(graph(g) for g in attr.graphs)
        return removed

    def graph(g) -> int:
        return clean(g) + nodes(g.node) + sum(clean(h) for h in (*g.input, *g.output, *g.value_info, *g.initializer))

    removed = clean(model) + graph(model.graph)
    for fn in model.functions:
        removed += clean(fn) + nodes(fn.node) + sum(clean(h) for h in fn.value_info)
    return removed


def _strip_local_paths_in_file(path: Path, roots: Sequence[str]) -> None:
    """strip_local_paths on a saved model; external weights (model.onnx.data) are neither read nor rewritten."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if strip_local_paths(model, roots):
        onnx.save_model(model, str(path))  # tensors stored externally keep their references, untouched


def _manifest_sha256(model_dir: Path) -> str | None:
    manifest = Path(model_dir) / artifacts.MANIFEST
    return artifacts.sha256_file(manifest) if manifest.is_file() else None


def _pad_left(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def parity_rows(model_dir: Path, prompts: Sequence[str]) -> tuple[list[list[int]], str]:
    """Token rows for the parity check and what they are: the tokenized prompts ("text"), or without a
    tokenizer seeded random ids of PARITY_RANDOM_LENGTHS ("random-ids")."""
    if not has_tokenizer(model_dir):
        ids = random_token_ids(model_dir, (sum(PARITY_RANDOM_LENGTHS),), PARITY_SEED).tolist()
        bounds = np.cumsum((0,) + PARITY_RANDOM_LENGTHS)
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])], "random-ids"
    tokenizer = load_tokenizer(model_dir)
    rows = [tokenizer(p).input_ids for p in prompts]
    if not all(rows):
        raise PipelineError("export parity prompts: every prompt must tokenize to at least one token")
    return rows, "text"


@torch.inference_mode()
def parity(model, session, rows: Sequence[Sequence[int]]) -> dict[str, float]:
    """ORT vs torch logits on a left-padded batch of token rows: prefill (empty past), then one decode
    step in which each side feeds its own KV cache back. Padded positions are left out of the comparison."""
    from transformers import DynamicCache

    cfg = model.config
    rows = [list(r) for r in rows]
    ids, mask = _pad_left(rows, pad_id=0)  # padded positions are masked, so the id does not matter
    pos = position_ids(mask)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **empty_past_feeds(session, len(rows))}
    ort_out = session.run(None, feeds)
    cache = DynamicCache(config=cfg)
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos), cache=cache, use_cache=True).logits.numpy()
    valid = mask.astype(bool)
    prefill_diff = float(np.abs(ort_out[0][valid] - ref[valid]).max())
    prefill_top1 = float((ort_out[0][valid].argmax(-1) == ref[valid].argmax(-1)).mean())

    nxt = ref[:, -1].argmax(-1)[:, None].astype(np.int64)  # same token on both sides
    mask2 = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
    pos2 = position_ids(mask2, past_len=mask.shape[1])
    presents = dict(zip(output_names(cfg.num_hidden_layers)[1:], ort_out[1:]))
    past = {name.replace("present.", "past_key_values."): v for name, v in presents.items()}
    ort_dec = session.run(["logits"], {"input_ids": nxt, "attention_mask": mask2, "position_ids": pos2, **past})[0]
    ref_dec = model(input_ids=torch.from_numpy(nxt), attention_mask=torch.from_numpy(mask2),
                    position_ids=torch.from_numpy(pos2), cache=cache, use_cache=True).logits.numpy()
    return {"prefill_max_abs_diff": prefill_diff, "prefill_top1_agreement": prefill_top1,
            "decode_max_abs_diff": float(np.abs(ort_dec - ref_dec).max()),
            "decode_top1_agreement": float((ort_dec.argmax(-1) == ref_dec.argmax(-1)).mean()),
            "parity_positions": int(valid.sum()) + len(rows)}


def export_onnx(model_dir: Path, out_dir: Path, *, opset: int = MIN_OPSET, prompts: Sequence[str] = PARITY_PROMPTS,
                parity_atol: float = 1e-2, ort_optimization: str = "all",
                attn_implementation: str = "sdpa") -> dict[str, Any]:
    """Export model_dir (fp32) to out_dir/model.onnx, check it, and write manifest.json last.

    parity_atol: an export whose logits differ from torch by more than this (prefill or decode) is
    rejected, since a wrong graph must not become an artifact. Without a tokenizer in model_dir the
    check runs on seeded random ids instead of the prompts (manifest parity_inputs: "random-ids"
    instead of "text"). The manifest names the weights by the sha256 of model_dir/manifest.json (null
    without one), never by path, so it is the same wherever the checkout lives. Returns the manifest."""

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if opset < MIN_OPSET:
        raise PipelineError(f"export.opset must be >= {MIN_OPSET} (the dynamo exporter's minimum), got {opset}")
    if ort_optimization not in ORT_LEVELS:
        raise PipelineError(f"export.ort_optimization must be one of {', '.join(ORT_LEVELS)}; got {ort_optimization!r}")
    if not prompts:
        raise PipelineError("export parity prompts: give at least one prompt")
    model = load_hf_model(model_dir, torch.float32, attn_implementation)
    rows, parity_inputs = parity_rows(model_dir, prompts)
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    external = param_bytes > EXTERNAL_DATA_BYTES
    with artifacts.atomic_dir(out_dir) as tmp:
        path = tmp / MODEL_FILE
        _export_checked(model, path, opset, external, _local_roots(model_dir, out_dir, tmp))
        with tempfile.TemporaryDirectory(prefix="ort-opt-") as scratch:
            optimized = Path(scratch) / "optimized.onnx"
            session = ort_session(path, level=ort_optimization, optimized_path=optimized, external_data=external)
            ops_after = count_ops(optimized)
        metrics = parity(model, session, rows)
        del session
        worst = max(metrics["prefill_max_abs_diff"], metrics["decode_max_abs_diff"])
        if not worst <= parity_atol:  # also catches NaN
            raise PipelineError(f"{model_dir}: ONNX logits differ from torch by {worst:.3g} > export.parity_atol="
                                f"{parity_atol}; the exported graph is wrong for this model")
        ops_before = count_ops(path)
        cfg = model.config
        manifest = artifacts.write_manifest(
            tmp, kind="onnx-model", source_manifest_sha256=_manifest_sha256(model_dir), opset=opset, dtype="float32",
            external_data=external, attn_implementation=attn_implementation, parity_inputs=parity_inputs,
            inputs=input_names(cfg.num_hidden_layers), outputs=output_names(cfg.num_hidden_layers),
            dynamic_dims=["batch", "seq", "past_seq", "total_seq"],
            metrics={**metrics, "nodes_before": sum(ops_before.values()),
                     "nodes_after_ort": sum(ops_after.values())},
            graph={"ops_before": ops_before, "ops_after_ort": ops_after, "ort_optimization": ort_optimization},
            versions=library_versions())
    return manifest


def widen_bf16(model) -> int:
    """Rewrite an onnx.ModelProto's bfloat16 tensors as float32, in place (every bf16 value is exact in fp32):
    initializers, Cast targets, graph inputs, outputs and value infos. onnxruntime's CPU provider has no bf16
    kernels, so this is how the bf16 graph's structure and weights are checked on a CPU; its bf16 rounding is
    not exercised (TensorRT runs the graph as written). Returns how many entries changed."""
    import onnx
    from onnx import numpy_helper

    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    changed = 0
    g = model.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == bf16:
            wide = numpy_helper.to_array(init).astype(np.float32)
            g.initializer[i].CopyFrom(numpy_helper.from_array(wide, init.name))
            changed += 1
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                attr.i = fp32
                changed += 1
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == bf16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
                changed += 1
    for value in (*g.input, *g.output, *g.value_info):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = fp32
            changed += 1
    return changed


def export_half(model_dir: Path, out_dir: Path, dtype: str, *, opset: int = MIN_OPSET,
                prompts: Sequence[str] = PARITY_PROMPTS, min_top1: float = 0.95,
                attn_implementation: str = "sdpa") -> dict[str, Any]:
    """Export model_dir in `dtype` (fp16 | bf16) to out_dir/model.onnx: the graph a strongly typed TensorRT
    network takes its precision from. Checked like the fp32 export, against Hugging Face fp32: logits
    max-abs-diff (recorded) and top-1 agreement at prefill and at a decode step with past (gated: rounding
    makes half logits differ by design, see pipeline/precision.py). fp16 runs in onnxruntime as exported; bf16
    runs widened to fp32 (widen_bf16). Returns the manifest."""
    import onnx

    from pipeline.precision import PRECISIONS, torch_dtype

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ("fp16", "bf16"):
        raise PipelineError(f"export.half must be fp16 or bf16, got {dtype!r}")
    reference = load_hf_model(model_dir, torch.float32, attn_implementation)
    half = load_hf_model(model_dir, torch_dtype(dtype), attn_implementation)
    rows, parity_inputs = parity_rows(model_dir, prompts)
    external = 2 * sum(p.numel() for p in half.parameters()) > EXTERNAL_DATA_BYTES
    with artifacts.atomic_dir(out_dir) as tmp:
        path = tmp / MODEL_FILE
        _export_checked(half, path, opset, external, _local_roots(model_dir, out_dir, tmp))
        del half
        checked, execution = path, "as exported"
        with tempfile.TemporaryDirectory(prefix="onnx-bf16-") as scratch:
            if dtype == "bf16":
                graph = onnx.load(str(path))
                widen_bf16(graph)
                checked = Path(scratch) / MODEL_FILE
                onnx.save_model(graph, str(checked), save_as_external_data=external)
                execution = "bf16 widened to fp32 (onnxruntime's CPU provider has no bf16 kernels)"
            session = ort_session(checked)
            metrics = parity(reference, session, rows)
            del session
        worst = min(metrics["prefill_top1_agreement"], metrics["decode_top1_agreement"])
        if not worst >= min_top1:  # also catches NaN logits
            raise PipelineError(f"{model_dir}: the {dtype} ONNX graph agrees with Hugging Face fp32 on {worst:.3f} of "
                                f"top-1 tokens < export.half_min_top1={min_top1}; the {dtype} export is wrong for "
                                f"this model (fp16 overflow? try export.half=bf16)")
        cfg = reference.config
        return artifacts.write_manifest(
            tmp, kind="onnx-model", source_manifest_sha256=_manifest_sha256(model_dir), opset=opset,
            dtype=PRECISIONS[dtype].long_name, precision=dtype, external_data=external,
            attn_implementation=attn_implementation, parity_inputs=parity_inputs, parity_execution=execution,
            inputs=input_names(cfg.num_hidden_layers), outputs=output_names(cfg.num_hidden_layers),
            dynamic_dims=["batch", "seq", "past_seq", "total_seq"], metrics=metrics, versions=library_versions())
