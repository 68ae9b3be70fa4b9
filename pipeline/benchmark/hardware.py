"""The hardware figures a roofline divides by: memory bandwidth (GB/s) and the matmul peak (TFLOP/s) of the
dtype the model computes in, either measured on the spot (hardware.measure=true) or the preset's published
datasheet figures.

Measurements, on the device the backend runs on, best of repeated timings within a time budget:
- copy bandwidth: one large device-to-device copy; bytes read + bytes written per second. The buffer is far
  larger than any cache (1 GiB on a GPU, 256 MiB on a CPU), so it measures memory, not cache.
- matmul peak: square matmuls (8192 on a GPU, the size of the lent H100/H200 figures; on a CPU the size doubles
  from 256 until one product takes ~50 ms); 2 * n^3 FLOPs each. int8 uses torch._int_mm, fp8 torch._scaled_mm.
On a CPU both together take about 1.3 s (2 cores); on a GPU about two seconds."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import PipelineError

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Budget:
    copy_bytes: int        # size of the copied buffer
    copy_s: float          # time spent repeating the copy
    matmul_max_n: int      # largest square size tried
    matmul_target_s: float  # grow n until one product takes this long (or n hits matmul_max_n)
    matmul_s: float        # time spent repeating the product
    inner: int = 1         # calls per timed sample: on a GPU, 10 back-to-back launches hide the sync's latency


BUDGETS = {"cuda": Budget(1 << 30, 1.0, 8192, 0.0, 1.0, inner=10),
           "cpu": Budget(256 << 20, 0.3, 4096, 0.05, 0.3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device: torch.device, budget_s: float, min_reps: int = 3,
                  inner: int = 1) -> float:
    """Seconds per call: the fastest sample of `inner` back-to-back calls (after one untimed warm-up), sampled
    until budget_s has passed."""
    fn()
    _sync(device)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
        reps += 1
    return best


def copy_bandwidth_gbs(device: torch.device, nbytes: int, budget_s: float, inner: int = 1) -> float:
    """Device-to-device copy of nbytes: (read + written) bytes / best time, in GB/s."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, budget_s, inner=inner)
    return 2 * nbytes / seconds / 1e9


def _matmul(device: torch.device, dtype: str, n: int) -> Callable[[], Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    if dtype in _FLOAT_DTYPES:
        a = torch.randn(n, n, device=device, dtype=_FLOAT_DTYPES[dtype], generator=gen)
        b = torch.randn(n, n, device=device, dtype=_FLOAT_DTYPES[dtype], generator=gen)
        return lambda: torch.mm(a, b)
    if dtype == "int8":
        a = torch.randint(-64, 64, (n, n), device=device, dtype=torch.int8, generator=gen)
        b = torch.randint(-64, 64, (n, n), device=device, dtype=torch.int8, generator=gen)
        return lambda: torch._int_mm(a, b)
    if dtype == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise PipelineError(f"hardware.measure=true: fp8 matmuls need a CUDA device of capability 8.9+, not "
                                f"{device}; set hardware.measure=false with hardware.peak_tflops.fp8")
        a = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn).t()  # column-major, as required
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    raise PipelineError(f"hardware.peak_tflops: unknown dtype {dtype!r} (fp32, fp16, bf16, fp8, int8)")


def matmul_tflops(device: torch.device, dtype: str, budget: Budget) -> tuple[float, int]:
    """(best TFLOP/s of an n x n x n product in `dtype`, n)."""
    n = budget.matmul_max_n if budget.matmul_target_s <= 0 else 256
    while True:
        try:
            product = _matmul(device, dtype, n)
            one_s = _best_seconds(product, device, 0.0, min_reps=1)
        except RuntimeError as e:  # e.g. an op this torch build lacks for the dtype or device
            raise PipelineError(f"hardware.measure=true: cannot run a {dtype} matmul on {device} "
                                f"({str(e).splitlines()[0]}); set hardware.measure=false with "
                                f"hardware.peak_tflops.{dtype}") from None
        if n >= budget.matmul_max_n or one_s >= budget.matmul_target_s:
            break
        n *= 2
    seconds = _best_seconds(product, device, budget.matmul_s, inner=budget.inner)
    return 2 * n**3 / seconds / 1e12, n


def measure(device: torch.device, dtype: str, budget: Budget | None = None) -> dict[str, Any]:
    """Measured {memory_bandwidth_gbs, peak_tflops, ...} for `dtype` on `device`, and how they were measured."""
    budget = budget or BUDGETS[device.type]
    t0 = time.perf_counter()
    bandwidth = copy_bandwidth_gbs(device, budget.copy_bytes, budget.copy_s, budget.inner)
    tflops, n = matmul_tflops(device, dtype, budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"memory_bandwidth_gbs": round(bandwidth, 2), "peak_tflops": round(tflops, 4),
            "method": f"copy of {budget.copy_bytes / 2**20:.0f} MiB (read + written); {dtype} matmul "
                      f"{n}x{n}x{n}; best of repeats", "seconds": round(time.perf_counter() - t0, 3)}


def published(hw: dict[str, Any], dtype: str) -> dict[str, float]:
    """The preset's {memory_bandwidth_gbs, peak_tflops} for `dtype`; fails naming the missing key. The launcher
    calls it before any worker starts when hardware.measure=false."""
    peak = (hw.get("peak_tflops") or {}).get(dtype)
    if not hw.get("memory_bandwidth_gbs"):
        missing = "memory_bandwidth_gbs"
    elif not peak:
        missing = f"peak_tflops.{dtype}"
    else:
        return {"memory_bandwidth_gbs": float(hw["memory_bandwidth_gbs"]), "peak_tflops": float(peak)}
    raise PipelineError(f"hardware.{missing} is not set and hardware.measure=false ({dtype} matmuls); give the "
                        f"published figure or set hardware.measure=true")


def figures(hw: dict[str, Any], device: torch.device, dtype: str) -> dict[str, Any]:
    """The figures the roofline uses, from the job's `hardware` entry (HardwareConfig as a dict): measured when
    hw["measure"], else the preset's published ones. Recorded in the benchmark conditions as returned."""
    out: dict[str, Any] = {"name": hw.get("name"), "peak_dtype": dtype}
    if not hw["measure"]:
        return {**out, "source": "published", **published(hw, dtype)}
    out.update(source="measured", **measure(device, dtype))
    datasheet = {k: hw[k] for k in ("memory_bandwidth_gbs", "peak_tflops") if hw.get(k)}
    if datasheet:  # kept next to the measured figures for comparison
        out["published"] = datasheet
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """What a result ran on: device name, driver and CUDA versions (GPU), CPU model, library versions."""
    from pipeline.versions import library_versions

    env: dict[str, Any] = {"device_type": device.type, "libraries": library_versions()}
    try:
        import triton

        env["libraries"]["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env
