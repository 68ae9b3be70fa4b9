"""The exported decoder's interface, and onnxruntime sessions to run it.

One graph serves prefill and decode. Its interface is the contract between the export stage
(pipeline/export.py, which writes it) and everything that runs it (calibrate, evaluate, the
onnxruntime backend):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past_seq + seq] int64,
             position_ids [batch, seq] int64, past_key_values.{i}.key/.value [batch, kv_heads, past_seq, head_dim]
    outputs  logits [batch, seq, vocab] float32, present.{i}.key/.value [batch, kv_heads, past_seq + seq, head_dim]

Prefill feeds past tensors with past_seq = 0; decode feeds the previous step's presents back.
onnx and onnxruntime are imported at call time, so importing this module costs nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from collections.abc import Sequence

import numpy as np

MODEL_FILE = "model.onnx"  # inside an ONNX artifact directory (export and calibrate write it)
ORT_LEVELS = ("basic", "extended", "all")


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def position_ids(mask: np.ndarray, past_len: int = 0) -> np.ndarray:
    """Positions for an attention mask [batch, past_len + seq] -> [batch, seq]. They count attended
    tokens only, so left padding does not shift RoPE (as HF generate does)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.clip(pos, 0, None)[:, past_len:].astype(np.int64)


def empty_past_feeds(session, batch: int) -> dict[str, np.ndarray]:
    """Past tensors of length 0 for a prefill, shaped from the session's own input signature."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feeds[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=dtype)
    return feeds


def count_ops(model_path: Path) -> dict[str, int]:
    """Node count by op type of the main graph (weights not loaded)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def ort_session(model_path: Path, *, level: str = "all", providers: Sequence[str] = ("CPUExecutionProvider",),
                optimized_path: Path | None = None, num_threads: int = 0, external_data: bool = False):
    """An onnxruntime InferenceSession at graph optimization `level` (one of ORT_LEVELS). With
    optimized_path, ORT also writes the graph it optimized there (its initializers to
    <optimized_path>.data when external_data)."""
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
