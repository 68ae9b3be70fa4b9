"""Hugging Face Llama -> ONNX decoder with KV cache, checked against the torch reference.

One graph serves prefill and decode. Its interface (the contract for calibrate, evaluate and the
onnxruntime backend):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past_seq + seq] int64,
             position_ids [batch, seq] int64, past_key_values.{i}.key/.value [batch, kv_heads, past_seq, head_dim]
    outputs  logits [batch, seq, vocab] float32, present.{i}.key/.value [batch, kv_heads, past_seq + seq, head_dim]

Prefill feeds past tensors with past_seq = 0; decode feeds the previous step's presents back.
Exported with `torch.onnx.export(dynamo=True)` around a wrapper with flat past/present tensors
(REFERENCE.md, ONNX; optimum cannot export with transformers 5)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.versions import library_versions

MODEL_FILE = "model.onnx"
MIN_OPSET = 18  # torchlib's minimum for the dynamo exporter
# protobuf refuses messages over 2 GiB; leave room for the graph itself next to the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000
ORT_LEVELS = ("basic", "extended", "all")
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


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The Hugging Face reference model, in eval mode (safetensors only, no remote code)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PipelineError(f"{model_dir}/config.json: not found; run the weights stage first (dvc repro weights)")
    model_type = _read_config(model_dir).get("model_type")
    if model_type != "llama":
        raise PipelineError(f"{model_dir}/config.json: model_type is {model_type!r}; only 'llama' models can be "
                            f"exported")
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                            trust_remote_code=False, attn_implementation=attn_implementation).eval()


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the model directory brings a tokenizer. Random presets made with model.tokenizer=source
    have none (their manifest says "tokenizer": false); accuracy stages then feed seeded random ids."""
    return (Path(model_dir) / "tokenizer.json").is_file()


def random_token_ids(model_dir: Path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded uniform token ids in [0, vocab_size) of model_dir/config.json -> int64 array of shape."""
    vocab = int(_read_config(model_dir)["vocab_size"])
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int64)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not has_tokenizer(model_dir):
        raise PipelineError(f"{model_dir}/tokenizer.json: not found; the model directory needs its tokenizer")
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def _read_config(model_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(model_dir) / "config.json").read_text())


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


def empty_past_feeds(session, batch: int) -> dict[str, np.ndarray]:
    """Past tensors of length 0 for a prefill, shaped from the session's own input signature."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feeds[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=dtype)
    return feeds


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
    past = tuple(torch.randn(b, cfg.num_key_value_heads, p, head_dim, generator=gen) for _ in range(2 * n_layers))
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


def count_ops(model_path: Path) -> dict[str, int]:
    """Node count by op type of the main graph (weights not loaded)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def ort_session(model_path: Path, *, level: str = "all", providers: Sequence[str] = ("CPUExecutionProvider",),
                optimized_path: Path | None = None, num_threads: int = 0, external_data: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    if num_threads:
        so.intra_op_num_threads = num_threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if external_data:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        optimized_path.name + ".data")
    return ort.InferenceSession(str(model_path), so, providers=list(providers))


def _pad_left(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids(mask: np.ndarray, past_len: int = 0) -> np.ndarray:
    """Positions count attended tokens only, so left padding does not shift RoPE (as HF generate does)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.clip(pos, 0, None)[:, past_len:].astype(np.int64)


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
    instead of "text"). Returns the manifest."""
    import onnx

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
        _torch_export(model, path, opset, external)
        try:
            onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB
        except Exception as e:
            raise PipelineError(f"{path.name}: onnx.checker rejected the exported graph "
                                f"({str(e).splitlines()[0]})") from e
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
            tmp, kind="onnx-model", model_dir=str(model_dir), opset=opset, dtype="float32",
            external_data=external, attn_implementation=attn_implementation, parity_inputs=parity_inputs,
            inputs=input_names(cfg.num_hidden_layers), outputs=output_names(cfg.num_hidden_layers),
            dynamic_dims=["batch", "seq", "past_seq", "total_seq"],
            metrics={**metrics, "nodes_before": sum(ops_before.values()),
                     "nodes_after_ort": sum(ops_after.values())},
            graph={"ops_before": ops_before, "ops_after_ort": ops_after, "ort_optimization": ort_optimization},
            versions=library_versions())
    return manifest
