"""Weight-quantized linears of the project's Llama (the WEIGHT_QUANT_PRECISIONS of pipeline/precision.py).

`quantize_(model, precision)` swaps every nn.Linear (lm_head included; embeddings and norms stay float) for:

    int8-wo  Int8WeightOnlyLinear   int8 weight [out, in] + float32 scale [out]; y = (x @ q.T) * scale
    fp8-wo   Fp8WeightOnlyLinear    float8_e4m3fn weight + float32 scale, dequantized in the matmul
    fp8      Fp8Linear              float8_e4m3fn weight + float32 scale, x quantized per token to e4m3 on
                                    the fly, one torch._scaled_mm with both scale vectors

Weights are quantized symmetrically per output channel from their amax: scale = amax / qmax (qmax 127 for
int8, 448 for e4m3), q = round(w / scale). A row of zeros gets scale 1 (q = 0, dequantizes to 0). Per-row
scales commute with concatenating rows, so fused linears (wqkv, w13) quantize exactly like their parts.

Scales are float32 everywhere: torch._scaled_mm requires float32 scales, and a bf16 scale would let inductor
rewrite the int8 pattern into torch._weight_int8pack_mm on CUDA (see Int8WeightOnlyLinear). Weights and
scales are buffers, so `.to(device)` and state_dict carry them; `.to(dtype)` leaves them as stored.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import gemv
from pipeline.precision import PRECISIONS, WEIGHT_QUANT_PRECISIONS

INT8_MAX = 127        # symmetric: -128 is never used, so -q is always representable
FP8_MAX = 448.0       # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPE = torch.float8_e4m3fn
QMAX = {"int8": INT8_MAX, "fp8_e4m3": FP8_MAX}
STORAGE_DTYPE = {"int8": torch.int8, "fp8_e4m3": FP8_DTYPE}
# torch._scaled_mm (CUDA) needs K and N divisible by 16; M is padded to a multiple of 16 (see Fp8Linear).
SCALED_MM_ALIGN = 16
# Smallest per-token amax used for an activation scale: a row of zeros must not divide by zero.
ACT_AMAX_FLOOR = 1e-12


def quantize_weight(weight: torch.Tensor, fmt: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a [out, in] weight -> (q [out, in] in STORAGE_DTYPE[fmt],
    scale [out] float32), so that weight ~= q.float() * scale[:, None]. Computed in float32 on the weight's
    device. `name` (the module path) only labels the error for non-finite weights."""
    if fmt not in QMAX:
        raise PipelineError(f"weight format {fmt!r} is not one of {', '.join(QMAX)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        raise PipelineError(f"{name}: weight has non-finite values; it cannot be quantized (check the checkpoint)")
    scale = torch.where(amax > 0, amax / QMAX[fmt], torch.ones_like(amax))
    scaled = w / scale[:, None]
    if fmt == "int8":
        q = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:  # the cast rounds to nearest even; the clamp keeps a rounding overshoot of amax / scale in range
        q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] from quantize_weight's (q, scale)."""
    return q.float() * scale[:, None]


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) e4m3 quantization of a 2-D activation [M, K] -> (x_fp8 [M, K],
    scale [M, 1] float32), the row-wise scale_a layout torch._scaled_mm takes."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_AMAX_FLOOR) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class _QuantizedLinear(nn.Module):
    """Common part: the [out, in] weight and float32 [out] scale buffers, construction from an nn.Linear."""

    fmt: str = ""
    precision: str = ""
    align: int = 1  # in and out features must be multiples of this (the kernel's rule), checked at quantize time

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=STORAGE_DTYPE[self.fmt],
                                                   device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, name: str = "linear") -> _QuantizedLinear:
        if linear.bias is not None:
            raise PipelineError(f"{name}: has a bias; the quantized linears carry none (Llama has no biases)")
        if linear.in_features % cls.align or linear.out_features % cls.align:
            raise PipelineError(f"precision.name={cls.precision}: {name} is [{linear.out_features}, "
                                f"{linear.in_features}]; its kernel needs both divisible by {cls.align}; "
                                f"use precision.name=fp8-wo")
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, device="meta")
        if weight.is_meta:  # structure only: a quantized state dict is loaded later (assign=True)
            return module
        module.weight, module.scale = quantize_weight(weight, cls.fmt, name)
        return module

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating tensor, and float8 counts as floating:
        # keep the stored formats and take only the move (device, to_empty) from `fn`.
        stored = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.fmt}[{self.out_features}, {self.in_features}], scale=float32[{self.out_features}]")


def _dequant_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The per-output-channel scale commutes with the matmul: x @ (q * s).T == (x @ q.T) * s, so the weight is
    # only cast (exact for int8 and e4m3 into bf16/fp16/fp32) and the scale is an epilogue. Under
    # torch.compile on CUDA inductor fuses the cast and the scale around the matmul; eager mode materializes
    # the cast weight (correct, not fast).
    return (F.linear(x, weight.to(x.dtype)) * scale).to(x.dtype)


def _dequant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # One row on CUDA (a batch-1 decode step): the Triton GEMV streams the 8-bit weight once at close to the
    # copy bandwidth, where inductor's fused cast reaches under half of it (benchmarks/gemv_microbench.py).
    if x.is_cuda and x.numel() == x.shape[-1]:
        return gemv.gemv(x.reshape(1, -1), weight, scale).reshape(*x.shape[:-1], weight.shape[0])
    return _dequant_matmul(x, weight, scale)


class Int8WeightOnlyLinear(_QuantizedLinear):
    """int8-wo: int8 weight, float32 per-output-channel scale, compute in x's dtype (bf16 for int8-wo).

    CUDA: `_dequant_linear`, so inductor fuses the cast into the matmul. Not torch._weight_int8pack_mm: its
    CUDA kernel (aten/src/ATen/native/cuda/int8mm.cu) is a plain float32 kernel, one thread (newer: one warp)
    per output element, no tensor cores: x is copied to float32 and the output back (two extra kernels per
    linear at batch 1) and every sequence of the batch re-reads the whole weight. The float32 scale also
    keeps inductor's weight-only-int8 pattern (which requires a bf16 scale, and lists cuda among its devices)
    from rewriting this expression into that kernel (tests/test_quant.py checks it on CPU).
    CPU: torch._weight_int8pack_mm, a vectorized int8 kernel: about 20x faster than the eager cast + matmul
    at M=1 on a 4096 x 4096 weight in torch 2.13 (0.44 ms vs 9.5 ms), same accuracy; it takes the scale in
    x's dtype."""

    fmt, precision = "int8", "int8-wo"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return _dequant_linear(x, self.weight, self.scale)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight,
                                      self.scale.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8WeightOnlyLinear(_QuantizedLinear):
    """fp8-wo: float8_e4m3fn weight, float32 per-output-channel scale, dequantized inside the matmul (the same
    expression as int8 on CUDA: inductor fuses the e4m3 -> bf16 cast, which Triton supports from sm89). No
    fp8 weight-only kernel exists in torch; on CPU eager the cast weight is materialized per call."""

    fmt, precision = "fp8_e4m3", "fp8-wo"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dequant_linear(x, self.weight, self.scale)


class Fp8Linear(_QuantizedLinear):
    """fp8: float8_e4m3fn weight + dynamic per-token e4m3 activations through torch._scaled_mm.

    Layout rules of _scaled_mm: mat1 [M, K] row-major, mat2 [K, N] column-major (`weight.t()` of the [N, K]
    row-major buffer is exactly that, no copy), row-wise scales scale_a [M, 1] and scale_b [1, N] float32,
    out_dtype bf16 (the only output type row-wise scaling supports on CUDA). K and N must be multiples of 16
    (checked at quantize time). torch >= 2.11 checks only K and N, but M is padded to a multiple of 16 with
    zero rows anyway: it is the configuration measured on the H200 (1.21x at batch 256; batch 256 needs no
    pad), and compiled, the pad fuses into the activation quantization. use_fast_accum=True, as torchao's
    float8 inference default: Hopper's faster fp8 accumulation, which costs far less accuracy than the e4m3
    rounding of x itself."""

    fmt, precision, align = "fp8_e4m3", "fp8", SCALED_MM_ALIGN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        pad = -m % SCALED_MM_ALIGN
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))  # zero rows: amax floor keeps their scale finite, outputs dropped
        x_fp8, x_scale = quantize_rows_fp8(x2)
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.scale[None, :],
                             out_dtype=torch.bfloat16, use_fast_accum=True)
        return y[:m].reshape(*x.shape[:-1], self.out_features).to(x.dtype)


MODULES: dict[str, type[_QuantizedLinear]] = {cls.precision: cls for cls in (Int8WeightOnlyLinear,
                                                                         Fp8WeightOnlyLinear, Fp8Linear)}


def _precision(precision: str):
    p = PRECISIONS.get(precision)
    if p is None or precision not in MODULES:
        raise PipelineError(f"precision.name={precision!r} is not a weight-quantized precision; "
                            f"use one of {', '.join(WEIGHT_QUANT_PRECISIONS)}")
    return p


def quantize_(model: nn.Module, precision: str) -> nn.Module:
    """Replace every nn.Linear of `model` (lm_head included) in place by the quantized linear of `precision`,
    quantizing its current weight (a meta weight gives an empty quantized module to load into). Returns model."""
    _precision(precision)
    cls = MODULES[precision]
    if isinstance(model, nn.Linear):
        raise PipelineError(f"precision.name={precision}: quantize_ replaces linears inside a model; "
                            f"got a bare nn.Linear (wrap it in a module)")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise PipelineError(f"precision.name={precision}: {type(model).__name__} has no nn.Linear to quantize "
                            f"(already quantized?)")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, cls.from_float(linear, name))
    return model


@functools.cache
def _cpu_failure(precision: str) -> str | None:
    """Run the precision's forward once on a 16 x 16 layer on CPU; the first line of the error if it fails.
    (Constant weights: nn.Linear's random init would move the caller's global RNG.)"""
    cls = MODULES[precision]
    layer = cls(SCALED_MM_ALIGN, SCALED_MM_ALIGN)
    layer.weight, layer.scale = quantize_weight(torch.ones(SCALED_MM_ALIGN, SCALED_MM_ALIGN), cls.fmt)
    try:
        layer(torch.ones(1, SCALED_MM_ALIGN, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def check_supported(precision: str, device: torch.device | str) -> None:
    """Raise a one-line PipelineError when `device` cannot run `precision`'s quantized linears: FP8 on a CUDA
    GPU below the precision's min_cuda_capability (no e4m3 tensor cores / Triton fp8 casts), a CPU torch build
    whose kernels refuse it (probed once: torch 2.13 CPU runs all three), any other device type."""
    p = _precision(precision)
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        try:
            capability = tuple(torch.cuda.get_device_capability(index))
            gpu = torch.cuda.get_device_name(index)
        except (AssertionError, RuntimeError) as e:
            raise PipelineError(f"precision.name={precision}: cannot query cuda:{index} "
                                f"({str(e).strip().splitlines()[0]}); use hardware.device=cpu") from None
        need = p.min_cuda_capability
        if need and capability < tuple(need):
            raise PipelineError(f"precision.name={precision} needs CUDA capability >= {need[0]}.{need[1]} "
                                f"(FP8 e4m3); cuda:{index} is {gpu} with {capability[0]}.{capability[1]}; "
                                f"use precision.name=int8-wo or bf16")
    elif device.type == "cpu":
        failure = _cpu_failure(precision)
        if failure:
            raise PipelineError(f"precision.name={precision}: torch {torch.__version__} cannot run it on cpu "
                                f"({failure}); use a CUDA device or another precision")
    else:
        raise PipelineError(f"precision.name={precision}: quantized linears run on cpu or cuda, not {device.type}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight as stored: parameters plus persistent buffers (quantized weights and their
    scales), each tensor once (tied weights are one tensor). Caches and rotary tables are not weights."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                tensors.setdefault(id(buf), buf)
    return sum(t.numel() * t.element_size() for t in tensors.values())
