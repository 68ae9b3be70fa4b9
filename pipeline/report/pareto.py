"""Serving results as operating points: which meet an SLO, which are Pareto-optimal, which is best.

A row is one backend x load point of metrics/serving.json (pipeline/benchmark/results.py write_serving). An SLO
here bounds p99 values: {"ttft_ms": 200, "tpot_ms": 50} means TTFT p99 <= 200 ms and TPOT p99 <= 50 ms.
Shared by the report (chart, best-per-SLO table) and `python -m pipeline advise`. Pure: no matplotlib."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def label(row: dict[str, Any]) -> str:
    """backend / precision / tp x pp: one line of the chart and one configuration of the advisor."""
    return f"{row['backend']} {row['precision']} tp{row.get('tp', 1)}xpp{row.get('pp', 1)}"


def load_label(row: dict[str, Any]) -> str:
    if row.get("load") == "concurrency":
        return f"{row['concurrency']} concurrent"
    rate = row.get("request_rate")
    return "max load" if rate is None or math.isinf(float(rate)) else f"{float(rate):g} req/s"


def slo_text(slo: dict[str, float]) -> str:
    if not slo:
        return "no SLO"
    return " and ".join(f"{name.removesuffix('_ms').upper()} p99 <= {bound:g} ms" for name, bound in slo.items())


def meets(row: dict[str, Any], slo: dict[str, float]) -> bool:
    """Whether the row's p99 of every bounded metric is within its bound (a missing value does not meet it)."""
    return all(row.get(f"{name}_p99", math.inf) <= bound for name, bound in slo.items())


def pareto_front(rows: Sequence[dict[str, Any]], latency: str, throughput: str = "output_token_throughput") \
        -> list[dict[str, Any]]:
    """Rows no other row beats on both lower `latency` and higher `throughput`, by increasing latency."""
    ordered = sorted(rows, key=lambda r: (r[latency], -r[throughput]))
    front, best = [], -math.inf
    for r in ordered:
        if r[throughput] > best:
            front.append(r)
            best = r[throughput]
    return front


def series(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by configuration and load kind (open-loop rates, closed-loop concurrencies: two sweeps), each
    group in increasing load."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        name = label(r) + (", closed loop" if r.get("load") == "concurrency" else "")
        groups.setdefault(name, []).append(r)
    key = (lambda r: float(r.get("concurrency") or r.get("request_rate") or math.inf))
    return {k: sorted(v, key=key) for k, v in groups.items()}


def best(rows: Sequence[dict[str, Any]], slo: dict[str, float], rank: str = "goodput") -> dict[str, Any] | None:
    """The row meeting `slo` with the highest `rank` value (ties: higher output throughput), or None."""
    ok = [r for r in rows if meets(r, slo) and r.get(rank) is not None]
    return max(ok, key=lambda r: (r[rank], r["output_token_throughput"]), default=None)


def cost_per_million(row: dict[str, Any], price_per_hour: float | None) -> float | None:
    """What a million output tokens cost at this point's output throughput (price of the machine per hour)."""
    tok_s = row.get("output_token_throughput") or 0
    if price_per_hour is None or tok_s <= 0:
        return None
    return price_per_hour / (tok_s * 3600) * 1e6
