"""Summary statistics as the serving-benchmark field defines them (vLLM `bench serve`, genai-perf): TTFT,
TPOT = (E2EL - TTFT) / (N - 1), E2EL; mean and percentiles with numpy's linear interpolation."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
PERCENTILE_METHOD = "linear"  # numpy's default interpolation, recorded next to the numbers


def summarize(name: str, values: Sequence[float]) -> dict[str, float]:
    """{name}_mean, {name}_p50, {name}_p90, {name}_p99 (min/max stay in the per-run CSV)."""
    arr = np.asarray(values, dtype=np.float64)
    out = {f"{name}_mean": arr.mean()}
    for p in PERCENTILES:
        out[f"{name}_p{p}"] = np.percentile(arr, p, method=PERCENTILE_METHOD)
    return {k: round(float(v), 4) for k, v in out.items()}


def request_metrics(t_send: float, token_times: Sequence[float]) -> dict[str, float]:
    """Per-request latency from the send time and the time each output token was available (seconds).

    TTFT = t_first - t_send, E2EL = t_end - t_send, TPOT = (E2EL - TTFT) / (N - 1)."""
    n = len(token_times)
    if n < 2:
        raise ValueError("TPOT needs at least two output tokens")
    ttft = token_times[0] - t_send
    e2el = token_times[-1] - t_send
    return {"ttft_ms": ttft * 1e3, "e2el_ms": e2el * 1e3, "tpot_ms": (e2el - ttft) / (n - 1) * 1e3}
