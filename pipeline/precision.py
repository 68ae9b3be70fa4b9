"""The one table of precisions: what each `precision.name` / `convert.dtype` value means to torch, to
Hugging Face and TensorRT-LLM configs, to FasterTransformer's files, and how close its logits must be.

Light on purpose (no torch import at module level): config validation and the backend registry read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Precision:
    name: str                      # the params value (precision.name, convert.dtype, evaluate.torch_precisions)
    torch_dtype: Optional[str]     # attribute of `torch`; None: no torch compute dtype (int8 = the ONNX QDQ graph)
    long_name: Optional[str]       # HF config.json `dtype`, TensorRT-LLM `dtype`, model.dtype values
    onnx_dtype: Optional[str]      # onnx.TensorProto element type of the graph's float tensors
    bits: int                      # weight storage bits (bytes moved per parameter = bits / 8)
    # Max |logits - Hugging Face fp32| accepted from a re-implementation (ONNX export, converted checkpoint)
    # at this precision; None: rounding makes logits differ by design, so gates use top-1 agreement only.
    logits_atol: Optional[float]
    # Weight-quantized torch precisions: weights stored as `weight_format` (per output channel scales) and
    # computed in `torch_dtype`; `activations` set: activations quantized per token on the fly too.
    weight_format: Optional[str] = None      # "int8" | "fp8_e4m3"
    activations: Optional[str] = None        # "fp8_e4m3"
    min_cuda_capability: Optional[tuple[int, int]] = None  # FP8 tensor cores: Ada/Hopper (8, 9) and newer


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    # fp32 re-implementations reorder float sums: 1.8e-7 measured on the tiny model, ~1e-4 on 8B shapes.
    Precision("fp32", "float32", "float32", "FLOAT", 32, 1e-3),
    Precision("fp16", "float16", "float16", "FLOAT16", 16, None),
    Precision("bf16", "bfloat16", "bfloat16", "BFLOAT16", 16, None),
    Precision("int8", None, None, None, 8, None),  # the ONNX INT8 QDQ graph (W8A8) from the calibrate stage
    Precision("int8-wo", "bfloat16", None, None, 8, None, weight_format="int8"),
    Precision("fp8-wo", "bfloat16", None, None, 8, None, weight_format="fp8_e4m3", min_cuda_capability=(8, 9)),
    Precision("fp8", "bfloat16", None, None, 8, None, weight_format="fp8_e4m3", activations="fp8_e4m3",
              min_cuda_capability=(8, 9)),
)}
# Plain torch dtypes (what weights can be stored and converted as).
FLOAT_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.torch_dtype is not None and not p.weight_format)
# Weight-quantized precisions of the project's own model (pipeline/model/quant.py).
WEIGHT_QUANT_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.weight_format)
STORAGE_DTYPES = tuple(PRECISIONS[name].long_name for name in FLOAT_PRECISIONS)
BY_LONG_NAME = {PRECISIONS[name].long_name: name for name in FLOAT_PRECISIONS}


def torch_dtype(name: str):
    """torch dtype of a float precision name ('fp16' -> torch.float16)."""
    import torch

    from pipeline.errors import PipelineError

    p = PRECISIONS.get(name)
    if p is None or p.torch_dtype is None:
        raise PipelineError(f"precision {name!r} has no torch dtype (float precisions: {', '.join(FLOAT_PRECISIONS)})")
    return getattr(torch, p.torch_dtype)
