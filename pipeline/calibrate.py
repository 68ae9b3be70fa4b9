"""INT8 static quantization of the exported decoder with onnxruntime (QDQ, TensorRT-compatible settings).

Settings that follow from what was measured and from TensorRT's explicit-quantization rules:
- weights QInt8 per channel, activations QInt8 *symmetric* (every zero point 0: TensorRT's parser
  rejects non-zero zero points, and ORT's defaults are asymmetric QUInt8);
- standard ONNX Q/DQ only (no com.microsoft contrib Q/DQ);
- MatMul only by default: quantizing every op type also quantizes the attention-mask path
  (values of -3.4e38) and breaks the histogram calibrators;
- the calibration set holds prefill samples (empty past) *and* decode samples (one token on a
  past of seq_len), which have different shapes, so every calibrator collects one feed at a time
  (`CalibStridedMinMax: 1`, which needs a reader with __len__ and set_range).

The calibration table we write (`calibration.json`) is our own JSON: tensor name -> min/max/amax/scale/
zero_point for every quantized activation. It is *not* a TensorRT calibration cache (ORT's
`write_calibration_table` "calibration.cache" is not either; TensorRT 10+ needs none for a QDQ model)."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import artifacts
from pipeline.errors import PipelineError, read_text
from pipeline.model.tokenizer import CORPUS
from pipeline.onnx_io import MODEL_FILE
from pipeline.progress import progress_bar
from pipeline.versions import library_versions

METHODS = ("minmax", "entropy", "percentile")
TABLE_FILE = "calibration.json"
RANDOM_IDS = "random-ids (no tokenizer)"  # settings["dataset"] when model_dir has no tokenizer


def quantizable_op_types() -> tuple[str, ...]:
    """Op types onnxruntime has a quantization rule for (QDQ handlers plus QLinear kernels)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))


# --- calibration text -> token windows -> ORT feeds ------------------------------------------------------------

def load_calibration_text(corpus_path: Path = CORPUS, dataset: str | None = None, dataset_config: str | None = None,
                          split: str = "train", text_column: str = "text") -> str:
    """The embedded corpus, or a Hugging Face dataset split's text column (needs `datasets`)."""
    if dataset is None:
        corpus_path = Path(corpus_path)
        if not corpus_path.is_file():
            raise PipelineError(f"{corpus_path}: calibration text not found")
        return read_text(corpus_path, "save the calibration text as UTF-8")
    try:
        import datasets
    except ImportError:
        raise PipelineError(f"calibration.dataset={dataset!r} needs the `datasets` package (pip install datasets), "
                            f"or set calibration.dataset=null to use the embedded corpus") from None
    try:
        ds = datasets.load_dataset(dataset, dataset_config, split=split)
    except Exception as e:
        raise PipelineError(f"calibration.dataset={dataset!r} (split {split!r}) could not be loaded: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e
    if text_column not in ds.column_names:
        raise PipelineError(f"calibration.text_column={text_column!r} is not a column of {dataset!r} "
                            f"(columns: {', '.join(ds.column_names)})")
    return "\n".join(t for t in ds[text_column] if t)


def calibration_windows(model_dir: Path, text: str, *, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """num_samples token windows of seq_len + 1 tokens (prefill + one decode token) at seeded random,
    distinct offsets in the tokenized text -> int64 [num_samples, seq_len + 1]."""
    from pipeline.model.hf import load_tokenizer

    ids = np.asarray(load_tokenizer(model_dir)(text).input_ids, dtype=np.int64)
    starts = len(ids) - seq_len  # offsets that leave room for seq_len + 1 tokens
    if num_samples < 1 or starts < 1:
        raise PipelineError(f"calibration set is empty: the text has {len(ids)} tokens and calibration.seq_len="
                            f"{seq_len} needs {seq_len + 1} per sample, num_samples={num_samples}; give more text "
                            f"or lower calibration.seq_len")
    if num_samples > starts:
        raise PipelineError(f"calibration.num_samples={num_samples} exceeds the {starts} distinct windows of "
                            f"{seq_len + 1} tokens in the calibration text; lower it or give more text")
    offsets = np.sort(np.random.default_rng(seed).choice(starts, size=num_samples, replace=False))
    return np.stack([ids[o:o + seq_len + 1] for o in offsets])


def random_windows(model_dir: Path, *, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """For a model directory without a tokenizer: seeded uniform ids in [0, vocab_size) ->
    int64 [num_samples, seq_len + 1]. Ranges then reflect random tokens, not text."""
    from pipeline.model.hf import random_token_ids

    return random_token_ids(model_dir, (num_samples, seq_len + 1), seed)


def build_feeds(session, windows: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Prefill feeds (seq_len tokens, empty past) and decode feeds (the next token on the fp32 model's
    own presents), interleaved per batch."""
    from pipeline.onnx_io import empty_past_feeds

    past_names = [o.name.replace("present.", "past_key_values.") for o in session.get_outputs()[1:]]
    seq_len = windows.shape[1] - 1
    feeds = []
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    with progress_bar("calibration feeds (fp32 prefill)", total=len(batches)) as advance:
        for w in batches:
            b = len(w)
            pos = np.tile(np.arange(seq_len + 1, dtype=np.int64), (b, 1))
            prefill = {"input_ids": w[:, :seq_len], "attention_mask": np.ones((b, seq_len), np.int64),
                       "position_ids": pos[:, :seq_len], **empty_past_feeds(session, b)}
            presents = session.run(None, prefill)[1:]
            decode = {"input_ids": w[:, seq_len:], "attention_mask": np.ones((b, seq_len + 1), np.int64),
                      "position_ids": pos[:, seq_len:], **dict(zip(past_names, presents))}
            feeds += [prefill, decode]
            advance(1)
    return feeds


class FeedReader:
    """CalibrationDataReader over prepared feeds; __len__/set_range serve CalibStridedMinMax, and every
    feed handed out advances the progress bar."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], advance=lambda n=1: None):
        self.feeds, self.advance = feeds, advance
        self._it: Iterator = iter(feeds)

    def get_next(self):
        feed = next(self._it, None)
        if feed is not None:
            self.advance(1)
        return feed

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])


# --- checks made before anything is written -------------------------------------------------------------------

def _module_scope(node) -> str | None:
    """The Hugging Face module a node came from (e.g. 'lm_head', 'model.layers.0.mlp.up_proj'), read from
    the dynamo exporter's node metadata; our export wrapper adds one leading 'model.'."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]  # a Python list repr
            if len(scopes) >= 2:
                return scopes[-2].removeprefix("model.")
    return None


def resolve_nodes_to_exclude(graph, names: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """Node names pass through; a Hugging Face module name ('lm_head') selects that module's nodes of
    the quantized op types. Anything else is a typo and fails."""
    node_names = {n.name for n in graph.node}
    resolved: list[str] = []
    for name in names:
        if name in node_names:
            resolved.append(name)
            continue
        matches = [n.name for n in graph.node if n.op_type in op_types and _module_scope(n) == name]
        if not matches:
            raise PipelineError(f"calibration.nodes_to_exclude: {name!r} is neither a node name nor a module with "
                                f"{'/'.join(op_types)} nodes in the exported graph (e.g. 'lm_head', "
                                f"'model.layers.0.mlp.down_proj')")
        resolved += matches
    return resolved


def _check_smoothquant(alpha: float | None) -> None:
    if alpha is None:
        return
    if not 0.0 <= alpha <= 1.0:
        raise PipelineError(f"calibration.smoothquant_alpha must be in [0, 1] or null, got {alpha}")
    try:  # the exact module onnxruntime's quantize_static imports for SmoothQuant
        import neural_compressor.adaptor.ox_utils.smooth_quant  # noqa: F401
    except ImportError as e:
        raise PipelineError(f"calibration.smoothquant_alpha={alpha} needs neural-compressor with "
                            f"neural_compressor.adaptor.ox_utils.smooth_quant ({e}); install it or set "
                            f"calibration.smoothquant_alpha=null") from None


# --- calibration table -----------------------------------------------------------------------------------------

def calibration_table(qdq_model, ranges) -> dict[str, dict[str, float]]:
    """tensor -> {min, max, amax, scale, zero_point} for every activation feeding a QuantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq_model.graph.initializer}
    table = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        tensor = node.input[0]
        # A quantized graph output (e.g. logits) is renamed so the output keeps its name.
        key = tensor if tensor in ranges else tensor.removesuffix("_QuantizeLinear_Input")
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[key].range_value)
        table[tensor] = {"min": lo, "max": hi, "amax": max(abs(lo), abs(hi)),
                         "scale": float(numpy_helper.to_array(inits[node.input[1]])),
                         "zero_point": int(numpy_helper.to_array(inits[node.input[2]]))}
    return table


def write_calibration_table(path: Path, table: dict[str, dict[str, float]], **meta: Any) -> None:
    artifacts.atomic_write_json(Path(path), {"format": "llama3-pipeline-calibration/1", **meta, "tensors": table})


def load_calibration_table(path: Path) -> dict[str, dict[str, float]]:
    """Read calibration.json back; every entry must have a finite positive scale."""
    path = Path(path)
    try:
        tensors = json.loads(path.read_text())["tensors"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PipelineError(f"{path}: not a calibration table ({type(e).__name__}); "
                            f"rerun the calibrate stage") from None
    for name, entry in tensors.items():
        scale = entry.get("scale")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise PipelineError(f"{path}: tensor {name!r} has scale {scale!r}; scales must be finite and > 0")
    return tensors


# --- quantization ----------------------------------------------------------------------------------------------

class _DropPreprocessHint(logging.Filter):
    # quantize_static warns twice per call that pre-processing (shape inference) was skipped; it is
    # optional for a QDQ MatMul model (the shapes are dynamic anyway) and would only add noise to DVC logs.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize(onnx_path: Path, model_dir: Path, out_dir: Path, *, method: str = "minmax", num_samples: int = 16,
             seq_len: int = 32, seed: int = 0, batch_size: int = 1, op_types: Sequence[str] = ("MatMul",),
             nodes_to_exclude: Sequence[str] = (), quantize_outputs: bool = False, weight_matmuls_only: bool = False,
             percentile: float = 99.999, smoothquant_alpha: float | None = None, corpus_path: Path = CORPUS,
             dataset: str | None = None, dataset_config: str | None = None, dataset_split: str = "train",
             text_column: str = "text") -> dict[str, Any]:
    """Calibrate and quantize onnx_path into out_dir/{model.onnx[, .data], calibration.json, manifest.json};
    return the manifest. Every check runs before out_dir is touched; on failure no new output appears
    (and a previous out_dir is left as it was). A model_dir without tokenizer.json (a random preset) is
    calibrated on seeded random ids (settings["dataset"] = RANDOM_IDS); naming a dataset then fails.
    Otherwise settings["dataset"] names the text (the dataset, or the corpus file's name) and
    settings["text_sha256"] pins it. The manifest records no paths, so it is the same in every checkout."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    from pipeline.model.hf import has_tokenizer, read_config
    from pipeline.onnx_io import ort_session

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise PipelineError(f"{onnx_path}: not found; run the export stage first (dvc repro export_onnx)")
    if method not in METHODS:
        raise PipelineError(f"calibration.method must be one of {', '.join(METHODS)}; got {method!r}")
    for key, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise PipelineError(f"calibration.{key} must be >= 1, got {value}")
    if not 0 < percentile <= 100:
        raise PipelineError(f"calibration.percentile must be in (0, 100], got {percentile}")
    max_pos = read_config(model_dir).get("max_position_embeddings")
    if not isinstance(max_pos, int):
        raise PipelineError(f"{model_dir}/config.json: max_position_embeddings is {max_pos!r}, expected an integer")
    if seq_len + 1 > max_pos:
        raise PipelineError(f"calibration.seq_len={seq_len} plus one decode step exceeds max_position_embeddings="
                            f"{max_pos} ({model_dir}/config.json)")
    tokenized = has_tokenizer(model_dir)
    if dataset is not None and not tokenized:
        raise PipelineError(f"calibration.dataset={dataset!r} needs a tokenizer, but {model_dir}/tokenizer.json does "
                            f"not exist (a random preset calibrates on random ids); set calibration.dataset=null")
    if not op_types:
        raise PipelineError("calibration.op_types must name at least one op type (default: [MatMul])")
    allowed = quantizable_op_types()
    for op in op_types:
        if op not in allowed:
            raise PipelineError(f"calibration.op_types: {op!r} is not an op type onnxruntime can quantize "
                                f"(allowed: {', '.join(allowed)})")
    graph_model = onnx.load(str(onnx_path), load_external_data=False)
    present = {n.op_type for n in graph_model.graph.node}
    if not set(op_types) & present:
        raise PipelineError(f"calibration.op_types={list(op_types)}: none of them occurs in {onnx_path}")
    excluded = resolve_nodes_to_exclude(graph_model.graph, nodes_to_exclude, op_types)
    if weight_matmuls_only:
        # ORT's MatMulConstBOnly applies to the QOperator format only; in QDQ we exclude the
        # activation x activation MatMuls (attention scores and context) by name.
        weights = {i.name for i in graph_model.graph.initializer}
        excluded += [n.name for n in graph_model.graph.node
                     if n.op_type == "MatMul" and not any(x in weights for x in n.input)]
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph_model.graph.initializer)
    del graph_model
    _check_smoothquant(smoothquant_alpha)

    if tokenized:
        text = load_calibration_text(corpus_path, dataset, dataset_config, dataset_split, text_column)
        windows = calibration_windows(model_dir, text, num_samples=num_samples, seq_len=seq_len, seed=seed)
        # Named, not located: an absolute path would make the manifest differ between checkouts. The
        # text's sha256 pins what was read.
        source = dataset or Path(corpus_path).name
        text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    else:
        windows = random_windows(model_dir, num_samples=num_samples, seq_len=seq_len, seed=seed)
        source, text_sha256 = RANDOM_IDS, None
    feeds = build_feeds(ort_session(onnx_path), windows, batch_size)

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "UseQDQContribOps": False,
             "CalibStridedMinMax": 1, "CalibPercentile": percentile,
             # Q/DQ on op inputs only by default (as TensorRT places them for GEMMs): a Q/DQ on a MatMul
             # output would also round the logits to 255 levels.
             "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else list(op_types)}
    if smoothquant_alpha is not None:
        extra.update(SmoothQuant=True, SmoothQuantAlpha=smoothquant_alpha)
    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    with artifacts.atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="calib-") as scratch:
        ranges_path = Path(scratch) / "ranges.json"
        hint_filter = _DropPreprocessHint()
        logging.getLogger().addFilter(hint_filter)
        try:
            with progress_bar(f"calibrate ({method})", total=len(feeds)) as advance:
                quantize_static(str(onnx_path), str(tmp / MODEL_FILE), FeedReader(feeds, advance),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                                nodes_to_exclude=excluded, use_external_data_format=external,
                                calibrate_method=calib_method, extra_options=extra,
                                calibration_cache_path=str(ranges_path))
        except Exception as e:
            raise PipelineError(f"{onnx_path}: onnxruntime quantize_static ({method}) failed: "
                                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}") from e
        finally:
            logging.getLogger().removeFilter(hint_filter)
        qdq = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
        table = calibration_table(qdq, load_tensors_data(ranges_path))
        bad = [t for t, e in table.items() if not (math.isfinite(e["scale"]) and e["scale"] > 0)]
        if bad:
            raise PipelineError(f"{onnx_path}: calibration gave tensor {bad[0]!r} a scale that is not finite and > 0 "
                                f"({len(bad)} tensors); check the calibration text")
        write_calibration_table(tmp / TABLE_FILE, table, method=method)
        ops = [n.op_type for n in qdq.graph.node]
        settings = {"method": method, "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                    "batch_size": batch_size, "op_types": list(op_types), "nodes_to_exclude": list(nodes_to_exclude),
                    "quantize_outputs": quantize_outputs, "weight_matmuls_only": weight_matmuls_only,
                    "percentile": percentile if method == "percentile" else None,
                    "smoothquant_alpha": smoothquant_alpha, "dataset": source, "text_sha256": text_sha256}
        manifest = artifacts.write_manifest(
            tmp, kind="onnx-int8-qdq", source_sha256=artifacts.sha256_file(onnx_path),
            settings=settings, quant_format="QDQ", activation_type="QInt8 symmetric",
            weight_type="QInt8 symmetric per-channel",
            metrics={"calibration_feeds": len(feeds), "quantized_activations": len(table),
                     "quantize_linear_nodes": ops.count("QuantizeLinear"),
                     "dequantize_linear_nodes": ops.count("DequantizeLinear"),
                     "excluded_nodes": len(excluded)},
            versions=library_versions())
    return manifest
