"""Benchmark outputs: metrics JSON (DVC metrics), per-run CSV (DVC plots), run conditions (with the hardware
figures each backend's roofline used, measured or published)."""

from __future__ import annotations

import csv
import json
import io
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_json, atomic_write_text

# The roofline of each run (pipeline/benchmark/roofline.py, ScenarioRoofline.fields): bytes and FLOPs of a decode
# step, prefill FLOPs, the hardware figures used (GB/s; TFLOP/s of the precision's matmul dtype), the decode
# lower bound (ms), TPOT as % of it and prefill model FLOPs utilization (%). Per-scenario summaries carry the same.
ROOFLINE_COLUMNS = ["decode_bytes_per_step", "decode_flops_per_step", "prefill_flops", "memory_bandwidth_gbs",
                    "peak_tflops", "decode_bound_ms", "roofline_pct", "mfu_pct"]
RUN_COLUMNS = ["backend", "scenario", "tp", "pp", "batch_size", "prompt_length", "output_length", "run", "ttft_ms", "tpot_ms",
               "e2el_ms", "output_tokens", "tokens_per_s", *ROOFLINE_COLUMNS]


def write_results(results: dict[str, dict[str, Any]], metrics_path: Path, conditions_path: Path,
                  runs_path: Path, skipped: dict[str, str] | None = None,
                  parallel: dict[str, Any] | None = None, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """metrics: {backend: {load_s, scenario: summary}} of the backends that ran; conditions: {backend: facts,
    {"skipped": why} or {"failed": why} (its worker crashed or timed out)} plus
    "parallel": {tp, pp, benchmarked_by | not_benchmarked} saying how parallel.tp x parallel.pp was covered."""
    metrics = {name: r["metrics"] for name, r in results.items()}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results.values():
        writer.writerows(r["rows"])
    atomic_write_text(runs_path, buffer.getvalue())
    conditions = {name: r["conditions"] for name, r in results.items()}
    conditions.update({name: {"skipped": why} for name, why in (skipped or {}).items()})
    conditions.update({name: {"failed": why} for name, why in (failed or {}).items()})
    if parallel is not None:
        conditions["parallel"] = parallel
    atomic_write_json(conditions_path, conditions)
    atomic_write_json(metrics_path, metrics)
    return metrics


def read_runs(runs_path: Path) -> list[dict[str, Any]]:
    with open(runs_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.setdefault("tp", 1)
        row.setdefault("pp", 1)
        for key in RUN_COLUMNS[2:]:
            row[key] = float(row[key])
    return rows


def write_serving(results: dict[str, dict[str, Any]], precision: str, settings: dict[str, Any], metrics_path: Path,
                  conditions_path: Path, records_path: Path, skipped: dict[str, str] | None = None,
                  failed: dict[str, str] | None = None) -> dict[str, Any]:
    """The serve stage's outputs. metrics: {"settings": what every point shares, "points": one self-describing row
    per backend x load point (backend, precision, tp, pp, point, load, rate or concurrency, every metric)};
    conditions: {backend: facts (engine, compile time, hardware figures, environment), {"skipped": why} or
    {"failed": why}}; metrics also has "failed": {backend: why} when a worker crashed or timed out (what the report
    shows);
    records: JSON Lines, one per request (backend, point, id, lengths, send time, every token's time, seconds
    from the point's start), from which every metric can be recomputed."""
    points, lines = [], []
    for name, r in results.items():
        tp, pp = r["conditions"].get("tp", 1), r["conditions"].get("pp", 1)
        for key, m in r["points"].items():
            points.append({"backend": name, "precision": precision, "tp": tp, "pp": pp, "point": key, **m})
            lines += [json.dumps({"backend": name, "point": key, **rec}) for rec in r["records"][key]]
    atomic_write_text(records_path, "".join(line + "\n" for line in lines))
    conditions = {name: r["conditions"] for name, r in results.items()}
    conditions.update({name: {"skipped": why} for name, why in (skipped or {}).items()})
    conditions.update({name: {"failed": why} for name, why in (failed or {}).items()})
    atomic_write_json(conditions_path, conditions)
    summary = {"settings": settings, "points": points, **({"failed": dict(failed)} if failed else {})}
    atomic_write_json(metrics_path, summary)
    return summary
