"""Batch-1 decode matmuls of the Llama-3-8B shape on one GPU: cuBLAS / inductor against the Triton GEMV of
pipeline/model/gemv.py, per weight format, as achieved memory bandwidth (not a test: CI never runs it).

For each linear of a layer (wqkv, wo, w13, w2) and lm_head, and each weight format (bf16, int8, fp8 e4m3):
    baseline  bf16: F.linear (cuBLAS); int8/fp8: quant._dequant_matmul under torch.compile (inductor's fused
              cast + scale, the path REFERENCE.md measured at 45-49 % of the roofline)
    triton    gemv.launch over a sweep of (BLOCK_N, BLOCK_K, num_warps, num_stages); the best is reported
Timing: enough distinct copies of the weight that together they far exceed the 50 MB L2 (every call reads
from memory, as in a real step), all calls captured in one CUDA graph (no launch overhead), replayed and
timed with CUDA events. Prints a table and, per format and method, the matmul time of one whole decode step
(32 layers + lm_head) against the bytes it must read; writes everything as JSON to --output.

    python benchmarks/gemv_microbench.py --output gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from pipeline.model import gemv
from pipeline.model.quant import _dequant_matmul, quantize_weight

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 4096, 14336, 32, 8, 128, 128256, 32
SHAPES = {  # name: (N, K, calls per step)
    "wqkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, LAYERS),
    "wo": (HIDDEN, HIDDEN, LAYERS),
    "w13": (2 * INTER, HIDDEN, LAYERS),
    "w2": (HIDDEN, INTER, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}
FORMATS = ("bf16", "int8", "fp8_e4m3")
SWEEP = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (2, 4)))
COLD_BYTES = 1 << 30  # weights per timed graph: 20x the L2


def copy_bandwidth_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / time_graph(lambda: b.copy_(a), 1, reps=20) / 1e9


def time_graph(fn, calls: int, reps: int = 10) -> float:
    """Seconds per call of `fn` (which makes `calls` kernel calls), captured once into a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / calls


def weights(n: int, k: int, fmt: str):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt == "bf16":
        return w, torch.ones(n, device="cuda")
    return quantize_weight(w, fmt)


def measure(fmt: str, name: str, n: int, k: int, per_step: int, sweep, compiled_dequant) -> dict:
    base = weights(n, k, fmt)
    nbytes = base[0].numel() * base[0].element_size() + base[1].numel() * 4
    copies = [base] + [tuple(t.clone() for t in base) for _ in range(max(1, COLD_BYTES // nbytes) - 1)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def baseline():
        for w, s in copies:
            F.linear(x, w) if fmt == "bf16" else compiled_dequant(x, w, s)

    baseline_s = time_graph(baseline, len(copies))
    ref = gemv.reference(x, *base).float()
    best = None
    for config in sweep:
        def triton_calls(config=config):
            for w, s in copies:
                gemv.launch(x, w, s, config=config)

        try:
            err = (gemv.launch(x, *base, config=config).float() - ref).abs().max().item()
            t = time_graph(triton_calls, len(copies))
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory): skip it
            print(f"  {fmt} {name} {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        if best is None or t < best[1]:
            best = (config, t, err)
    return {"format": fmt, "linear": name, "n": n, "k": k, "bytes": nbytes, "calls_per_step": per_step,
            "baseline_us": baseline_s * 1e6, "triton_us": best[1] * 1e6, "triton_config": best[0],
            "triton_max_abs_err": best[2], "baseline_gbs": nbytes / baseline_s / 1e9,
            "triton_gbs": nbytes / best[1] / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("gemv_microbench.json"))
    p.add_argument("--quick", action="store_true", help="a 4-config sweep (checking the script, not tuning)")
    args = p.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    torch._dynamo.config.recompile_limit = 64  # one graph per shape and format
    sweep = SWEEP[:4] if args.quick else SWEEP
    bandwidth = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s; torch {torch.__version__}",
          flush=True)
    rows = []
    compiled_dequant = torch.compile(_dequant_matmul, dynamic=False)
    for fmt, (name, (n, k, per_step)) in itertools.product(FORMATS, SHAPES.items()):
        row = measure(fmt, name, n, k, per_step, sweep, compiled_dequant)
        rows.append(row)
        print(f"{fmt:9} {name:8} {n:6}x{k:5}  baseline {row['baseline_us']:8.1f} us {row['baseline_gbs']:6.0f} GB/s"
              f"  triton {row['triton_us']:8.1f} us {row['triton_gbs']:6.0f} GB/s {row['triton_config']} "
              f"err {row['triton_max_abs_err']:.2e}", flush=True)
        torch.cuda.empty_cache()
    steps = {}
    for fmt in FORMATS:
        mine = [r for r in rows if r["format"] == fmt]
        step_bytes = sum(r["bytes"] * r["calls_per_step"] for r in mine)
        for method in ("baseline", "triton"):
            ms = sum(r[f"{method}_us"] * r["calls_per_step"] for r in mine) / 1e3
            steps[f"{fmt}/{method}"] = {"matmul_ms_per_step": ms, "bytes_per_step": step_bytes,
                                        "roofline_ms": step_bytes / bandwidth / 1e6,
                                        "pct_of_roofline": 100 * step_bytes / bandwidth / 1e6 / ms}
            print(f"step matmuls {fmt:9} {method:8}: {ms:6.3f} ms for {step_bytes / 1e9:5.2f} GB "
                  f"({steps[f'{fmt}/{method}']['pct_of_roofline']:.0f} % of {bandwidth:.0f} GB/s)")
    args.output.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "copy_bandwidth_gbs": bandwidth, "rows": rows, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
