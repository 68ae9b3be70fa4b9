"""Reading the report's inputs: every file is checked before anything is drawn or written, so a
missing or malformed input fails with one line naming it and leaves no output behind."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.benchmark.results import read_runs
from pipeline.errors import PipelineError, read_json
from pipeline.report import tables

# Per-scenario fields of metrics/benchmark.json that the tables, plots and markdown read.
SCENARIO_FIELDS = ("ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99",
                   "e2el_ms_p50", "output_token_throughput", "peak_memory_mb", "decode_bound_ms", "roofline_pct",
                   "mfu_pct")
# What benchmark_conditions.json's "roofline" entry of each benchmarked backend must say (the figures used).
ROOFLINE_CONDITIONS = ("source", "memory_bandwidth_gbs", "peak_tflops", "peak_dtype")
# Per-artifact fields of metrics/evaluate.json (pipeline/evaluate.py `score` + `apply_gate`).
EVALUATE_FIELDS = ("ppl", "ppl_delta_pct", "top1_agreement", "kl_mean", "gate_pass")
# Per point of metrics/serving.json that the serving chart, tables and the advisor read.
SERVING_FIELDS = ("backend", "precision", "point", "load", "output_token_throughput", "request_throughput",
                  "goodput", "ttft_ms_p99", "tpot_ms_p99", "e2el_ms_p99", "completed")
RUN_FIELDS = ("backend", "scenario", "batch_size", "prompt_length", "output_length", "tpot_ms")


@dataclass
class ReportInputs:
    """The metrics files the report reads; optional ones add their section when given."""

    benchmark: Path
    conditions: Path
    runs: Path
    weights_metrics: Path
    weights_dir: Path
    verify: Path | None = None
    export: Path | None = None
    graph: Path | None = None
    calibrate: Path | None = None
    evaluate: Path | None = None
    serving: Path | None = None   # metrics/serving.json (stage serve)


@dataclass
class ReportData:
    """The parsed inputs; optional ones are None when their path was not given."""

    benchmark: dict[str, Any]
    conditions: dict[str, Any]
    runs: list[dict[str, Any]]
    weights: dict[str, Any]
    manifest: dict[str, Any]
    verify: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None
    calibrate: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    serving: dict[str, Any] | None = None


def _missing(path: Path) -> PipelineError:
    return PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _missing(path)
    return read_json(path, "rerun the stage that writes it (dvc repro)")  # every metrics file is a JSON object


def _read_runs(path: Path) -> list[dict[str, Any]]:
    try:
        return read_runs(path)
    except KeyError as e:
        raise PipelineError(f"{path}: no column {e}; rerun the benchmark stage (dvc repro)") from None
    except UnicodeDecodeError as e:  # before ValueError, its base class
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); rerun the benchmark stage "
                            f"(dvc repro)") from None
    except (ValueError, TypeError, csv.Error) as e:  # TypeError: a row cut short has None for its last columns
        raise PipelineError(f"{path}: a value is missing or not a number ({e}); rerun the benchmark stage "
                            f"(dvc repro)") from None


def _require(path: Path, where: str, entry: dict[str, Any], fields: tuple[str, ...]) -> None:
    absent = [f for f in fields if f not in entry]
    if absent:
        raise PipelineError(f"{path}: {where} lacks {', '.join(absent)}; rerun the stage that writes it (dvc repro)")


def load(inputs: ReportInputs) -> ReportData:
    """Read and check every input; raises PipelineError naming the first file that is missing or incomplete."""
    # Existence first, for all of them: the error should name a missing file before any other problem.
    required = [inputs.benchmark, inputs.conditions, inputs.runs, inputs.weights_metrics,
                Path(inputs.weights_dir) / artifacts.MANIFEST]
    optional = [inputs.verify, inputs.export, inputs.graph, inputs.calibrate, inputs.evaluate, inputs.serving]
    for path in required + [p for p in optional if p is not None]:
        if not Path(path).is_file():
            raise _missing(path)
    data = ReportData(benchmark=_read_json(inputs.benchmark), conditions=_read_json(inputs.conditions),
                      runs=_read_runs(inputs.runs), weights=_read_json(inputs.weights_metrics),
                      manifest=artifacts.read_manifest(inputs.weights_dir))
    for key in ("verify", "export", "graph", "calibrate", "evaluate", "serving"):
        path = getattr(inputs, key)
        if path is not None:
            setattr(data, key, _read_json(path))
    if not data.benchmark or not data.runs:
        raise PipelineError(f"{inputs.benchmark}: no benchmark results to report; run the benchmark stage (dvc repro)")
    for backend, scenarios in data.benchmark.items():
        if not isinstance(scenarios, dict):
            raise PipelineError(f"{inputs.benchmark}: {backend} is a {type(scenarios).__name__}, not an object of "
                                f"scenarios; rerun the benchmark stage (dvc repro)")
        for key, summary in scenarios.items():
            if isinstance(summary, dict):
                _require(inputs.benchmark, f"{backend}.{key}", summary, SCENARIO_FIELDS)
    _require(inputs.runs, "the header", data.runs[0], RUN_FIELDS)
    for backend in data.benchmark:
        _require(inputs.conditions, backend, data.conditions.get(backend, {}), ("roofline",))
        _require(inputs.conditions, f"{backend}.roofline", data.conditions[backend]["roofline"], ROOFLINE_CONDITIONS)
    absent = tables.missing_runs(data.benchmark, data.runs)
    if absent:
        raise PipelineError(f"{inputs.runs}: no runs for {', '.join(absent)} of {inputs.benchmark}; "
                            "rerun the benchmark stage (dvc repro)")
    if data.serving is not None:
        if not isinstance(data.serving.get("points"), list) or not isinstance(data.serving.get("settings"), dict):
            raise PipelineError(f"{inputs.serving}: no \"points\" list or \"settings\"; rerun the serve stage (dvc repro)")
        for i, row in enumerate(data.serving["points"]):
            _require(inputs.serving, f"points[{i}]", row, SERVING_FIELDS)
    for name, scored in (data.evaluate or {}).items():
        if isinstance(scored, dict):
            _require(inputs.evaluate, name, scored, EVALUATE_FIELDS)
    return data
