"""What the report computes: tables and series from the parsed metrics files.

Pure functions over plain dicts (no matplotlib, no file access), so the numbers behind every plot and
table can be tested on their own. Rows are ordered by backend (as in metrics/benchmark.json), then by
scenario shape (prompt length, batch size, output length), so plots read left to right as load grows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

# Identify a (backend, scenario) row; tp and pp say how the backend's model was split (1 = not split).
KEY_FIELDS = ("backend", "scenario", "batch_size", "prompt_length", "output_length", "tp", "pp")
# What plots/backend_scenarios.json keeps per row for `dvc plots`: medians in ms, throughput in tokens/s, the
# decode lower bound in ms and TPOT p50 as % of it.
PLOT_DATA_FIELDS = (*KEY_FIELDS, "ttft_ms_p50", "tpot_ms_p50", "e2el_ms_p50", "output_token_throughput",
                    "decode_bound_ms", "roofline_pct")


def _shape_order(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["prompt_length"], row["batch_size"], row["output_length"]


def scenario_table(benchmark: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per backend and scenario: its shape and layout (from the runs CSV) plus its summary stats.

    tp/pp come from the runs CSV's tp and pp columns; older CSVs without them ran unsplit (1, 1)."""
    shapes: dict[tuple[str, str], dict[str, int]] = {}
    for r in runs:
        shapes.setdefault((r["backend"], r["scenario"]), {
            "batch_size": int(r["batch_size"]), "prompt_length": int(r["prompt_length"]),
            "output_length": int(r["output_length"]), "tp": int(float(r.get("tp", 1))),
            "pp": int(float(r.get("pp", 1)))})
    table = []
    for backend, scenarios in benchmark.items():
        rows = [{"backend": backend, "scenario": key, **shapes[(backend, key)], **summary}
                for key, summary in scenarios.items() if isinstance(summary, dict)]
        table += sorted(rows, key=_shape_order)
    return table


def missing_runs(benchmark: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """`backend/scenario` pairs of benchmark.json with no row in the runs CSV (the two must agree)."""
    have = {(r["backend"], r["scenario"]) for r in runs}
    return [f"{b}/{k}" for b, scenarios in benchmark.items() for k, s in scenarios.items()
            if isinstance(s, dict) and (b, k) not in have]


def plot_records(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of plots/backend_scenarios.json: one record per backend and scenario (long format, so the
    DVC template can colour by the `backend` column whatever backends a run had)."""
    return [{f: row[f] for f in PLOT_DATA_FIELDS} for row in table]


def backends(table: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["backend"] for row in table))


def scenario_order(table: list[dict[str, Any]]) -> list[str]:
    """Every scenario key of any backend, ordered by shape."""
    return list(dict.fromkeys(row["scenario"] for row in sorted(table, key=_shape_order)))


def by_scenario(table: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """{backend: [metric per scenario in scenario_order]}, NaN where a backend lacks a scenario."""
    order = scenario_order(table)
    values = {(row["backend"], row["scenario"]): row[metric] for row in table}
    return {b: [values.get((b, s), math.nan) for s in order] for b in backends(table)}


def roofline_panels(table: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """{backend: {"scenario": [...], "tpot_ms_p50": [...], "decode_bound_ms": [...], "roofline_pct": [...]}}, the
    scenarios a backend ran in shape order: what the roofline chart draws, one panel per backend."""
    panels: dict[str, dict[str, list]] = {}
    for row in table:
        panel = panels.setdefault(row["backend"], {k: [] for k in ("scenario", "tpot_ms_p50", "decode_bound_ms",
                                                                    "roofline_pct")})
        for key, values in panel.items():
            values.append(row[key])
    return panels


def roofline_figures(cond: dict[str, Any]) -> str:
    """'bf16 weights, 4,800 GB/s and 989.5 TFLOP/s bf16 (published, NVIDIA H200 SXM 141GB)' from a backend's
    benchmark conditions: which hardware figures its roofline used and where they came from."""
    r = cond["roofline"]
    where = ", ".join(str(x) for x in (r["source"], r.get("name")) if x)
    devices = f" x {r['devices']} devices" if r.get("devices", 1) > 1 else ""
    return (f"{cond.get('precision')} weights, {r['memory_bandwidth_gbs']:,.4g} GB/s and {r['peak_tflops']:,.4g} "
            f"TFLOP/s {r['peak_dtype']}{devices} ({where})")


def throughput_lines(table: list[dict[str, Any]]) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(backend, prompt_length): [(batch_size, output tokens/s), ...] by batch size}."""
    lines: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in table:
        lines[(row["backend"], row["prompt_length"])].append((row["batch_size"], row["output_token_throughput"]))
    return {key: sorted(points) for key, points in lines.items()}


def tpot_groups(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """{"backend\\nscenario": [TPOT ms of each measured run]}, in CSV order."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        groups[f"{r['backend']}\n{r['scenario']}"].append(float(r["tpot_ms"]))
    return dict(groups)


def accuracy_rows(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scored artifacts of evaluate.json (it also holds scalars such as reference_ppl)."""
    return {name: m for name, m in evaluation.items() if isinstance(m, dict)}


def op_counts(graph: dict[str, Any]) -> list[tuple[str, int, int]]:
    """[(op type, nodes exported, nodes after ORT)], most frequent first, ties by name."""
    before, after = graph["ops_before"], graph["ops_after_ort"]
    ops = sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o))
    return [(op, before.get(op, 0), after.get(op, 0)) for op in ops]
