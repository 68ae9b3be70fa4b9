"""A Triton GEMV for batch-1 decode: y[1, N] = (x[1, K] @ W[N, K].T) * scale[N], W stored as int8, e4m3 or
bf16/fp16, read once from memory and cast in registers.

Why: a batch-1 decode step is a chain of matrix-vector products, bound by how fast the weights stream from
memory. Inside the compiled step inductor turns such a product into a reduction fused with the RMSNorm or
the dequantization before it; on an H200 that measured slower than this kernel (a whole 8B decode step:
bf16 4.67 against 5.40 ms, int8 4.00 against 5.07 ms, fp8 3.39 against 4.53 ms; BENCHMARKS.md). Each
program takes BLOCK_N whole rows and streams them along K in BLOCK_K chunks with wide, coalesced loads.

Registered as the custom op `llama3_pipeline::gemv` so that torch.compile(fullgraph=True) keeps it as one
opaque kernel inside the CUDA graph of the decode step. Only CUDA runs the kernel; elsewhere (and for more
than one row) the op computes the reference expression. tests/test_gemv.py compares the two on CUDA (gpu
marker; CI has no GPU)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# (BLOCK_N, BLOCK_K, num_warps, num_stages): the fastest of a 48-point sweep per Llama-3-8B linear and weight
# dtype on an H200 (benchmarks/gemv_microbench.py, L2-cold, CUDA-graph timed); DEFAULT for other shapes.
TUNED = {
    (torch.bfloat16, 6144, 4096): (16, 512, 8, 4), (torch.bfloat16, 4096, 4096): (16, 1024, 4, 4),
    (torch.bfloat16, 28672, 4096): (8, 1024, 8, 2), (torch.bfloat16, 4096, 14336): (16, 1024, 4, 2),
    (torch.bfloat16, 128256, 4096): (16, 256, 4, 2),
    (torch.int8, 6144, 4096): (16, 512, 8, 4), (torch.int8, 4096, 4096): (8, 1024, 4, 2),
    (torch.int8, 28672, 4096): (4, 1024, 4, 4), (torch.int8, 4096, 14336): (8, 1024, 4, 4),
    (torch.int8, 128256, 4096): (16, 256, 4, 2),
    (torch.float8_e4m3fn, 6144, 4096): (16, 512, 8, 4), (torch.float8_e4m3fn, 4096, 4096): (8, 1024, 4, 2),
    (torch.float8_e4m3fn, 28672, 4096): (16, 256, 4, 2), (torch.float8_e4m3fn, 4096, 14336): (8, 1024, 4, 4),
    (torch.float8_e4m3fn, 128256, 4096): (32, 256, 4, 4),
}
DEFAULT = {1: (8, 1024, 4, 4), 2: (16, 1024, 4, 4), 4: (8, 512, 4, 2)}  # by weight element size


def config_for(weight: torch.Tensor) -> tuple[int, int, int, int]:
    return TUNED.get((weight.dtype, *weight.shape), DEFAULT[weight.element_size()])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_ptrs = w_ptr + rows[:, None] * stride_wn + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(tl.cdiv(K, BLOCK_K)):
            k0 = i * BLOCK_K
            k_ok = (k0 + cols) < K
            # Streamed once: evict_first keeps the weights from pushing x (re-read by every program) out of L2.
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k0 + cols, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * s).to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
           config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel on x [1, K] (contiguous), weight [N, K] row-major, scale [N] float32 -> [1, N] in x's
    dtype. `config` overrides config_for(weight) (the microbenchmark sweeps it)."""
    n, k = weight.shape
    block_n, block_k, warps, stages = config or config_for(weight)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _kernel()[(triton_cdiv(n, block_n),)](x, weight, scale, y, n, k, weight.stride(0), BLOCK_N=block_n,
                                          BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in plain torch (float32 accumulation)."""
    return ((x.float() @ weight.float().t()) * scale).to(x.dtype)


@torch.library.custom_op("llama3_pipeline::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] x [N, K] -> [M, N]: the Triton kernel on CUDA when M == 1, `reference` otherwise."""
    if x.device.type == "cuda" and x.shape[0] == 1:
        return launch(x.contiguous(), weight, scale)
    return reference(x, weight, scale)


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class GemvLinear(nn.Module):
    """A bias-free float linear whose one-row calls on CUDA run the GEMV kernel. Inductor otherwise turns a
    one-row matmul into a reduction fused with the RMSNorm before it, which measured slower on an H200 (batch-1
    bf16 decode, benchmarks/gemv_microbench.py and BENCHMARKS.md). The weight stays the same parameter, so the
    state dict is unchanged; the unit scale is a non-persistent buffer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_buffer("scale", torch.ones(linear.out_features, device=linear.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.numel() == x.shape[-1]:
            return gemv(x.reshape(1, -1), self.weight, self.scale).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


def route_float_linears_(model: nn.Module) -> nn.Module:
    """Replace every bias-free nn.Linear of `model` in place by a GemvLinear (same weight). Returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.bias is None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, GemvLinear(module))
    return model
