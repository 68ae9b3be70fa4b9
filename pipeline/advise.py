"""`python -m pipeline advise --ttft-p99-ms 200 --tpot-p99-ms 50`: the measured configuration with the highest
goodput meeting a latency SLO, and what its output costs.

Reads every measured serving run: the workspace's metrics/serving.json and that file in every DVC experiment
(`dvc exp run`, queued or not; read through `dvc.api` from the local cache), or files given with --results.
Each row is one backend x precision x tp/pp x load point. A point qualifies when its p99 of every bounded metric
is within the bound; goodput (requests meeting the bounds per second) is recomputed from the point's
per-request records (metrics/serving_requests.jsonl) when they are at hand, for the SLO asked here, not the
one the run was configured with. Cost per million output tokens = price per hour / (output tok/s x 3600) x 1e6,
price from --price-per-hour or the run's hardware.price_per_hour."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import config, paths
from pipeline.errors import PipelineError, read_text
from pipeline.report import pareto
from pipeline.report.inputs import SERVING_FIELDS


@dataclass
class Run:
    source: str                     # "workspace", an experiment name, or a file path
    summary: dict[str, Any]         # metrics/serving.json
    records: list[dict[str, Any]] | None
    price_per_hour: float | None


_RERUN = "rerun the serve stage (dvc repro serve)"


def _records(text: str | None, where: str) -> list[dict[str, Any]] | None:
    if text is None:
        return None
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise PipelineError(f"{where}: a line is not valid JSON ({e}); rerun the serve stage (dvc repro serve)") from None


def _price(params: Any) -> float | None:
    hardware = params.get("hardware") if isinstance(params, dict) else None
    value = hardware.get("price_per_hour") if isinstance(hardware, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _parse(source: str, text: str, where: str) -> dict[str, Any]:
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{where}: not valid JSON ({e}); rerun the serve stage (dvc repro serve)") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("points"), list):
        raise PipelineError(f"{where}: no \"points\" list; rerun the serve stage (dvc repro serve)")
    for i, row in enumerate(summary["points"]):
        absent = [f for f in SERVING_FIELDS if not isinstance(row, dict) or f not in row]
        if absent:
            raise PipelineError(f"{where}: points[{i}] lacks {', '.join(absent)}; rerun the serve stage (dvc repro serve)")
    return summary


def workspace_run(root: Path = Path(".")) -> Run | None:
    metrics = root / paths.SERVING_METRICS
    if not metrics.is_file():
        return None
    records = root / paths.SERVING_RECORDS
    params = root / paths.PARAMS
    return Run("workspace", _parse("workspace", read_text(metrics, _RERUN), str(metrics)),
               _records(read_text(records, _RERUN), str(records)) if records.is_file() else None,
               _price(config.read_yaml(params)) if params.is_file() else None)


def experiment_runs(root: Path = Path(".")) -> list[Run]:
    """The serve results of every DVC experiment of the repository at root (none when it is not a DVC repo)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        rows = dvc.api.exp_show(repo=str(root))
    except DvcException:
        return []
    runs = []
    for row in rows:
        name, rev = row.get("Experiment"), row.get("rev")
        if not name or rev in (None, "workspace"):
            continue  # baselines are commits whose workspace result is read directly
        try:
            text = dvc.api.read(str(paths.SERVING_METRICS), repo=str(root), rev=rev)
        except (DvcException, FileNotFoundError, OSError):
            continue  # an experiment that did not run the serve stage
        try:
            records = dvc.api.read(str(paths.SERVING_RECORDS), repo=str(root), rev=rev)
        except (DvcException, FileNotFoundError, OSError):
            records = None
        price = row.get("hardware.price_per_hour")
        runs.append(Run(f"exp {name}", _parse(name, text, f"{paths.SERVING_METRICS} of experiment {name}"),
                        _records(records, f"{paths.SERVING_RECORDS} of experiment {name}"), float(price) if isinstance(price, (int, float)) else None))
    return runs


def file_run(path: Path) -> Run:
    """A serving.json given by path; its records are read from serving_requests.jsonl (or .jsonl.gz) beside it."""
    import gzip

    if not path.is_file():
        raise PipelineError(f"--results {path}: file not found; give a metrics/serving.json written by the serve stage")
    records = path.with_name(paths.SERVING_RECORDS.name)
    packed = records.with_name(records.name + ".gz")
    try:
        text = records.read_text() if records.is_file() else (
            gzip.decompress(packed.read_bytes()).decode() if packed.is_file() else None)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise PipelineError(f"{packed if not records.is_file() else records}: unreadable ({e})") from None
    # The last two folders name a result (e.g. run2/s_bf16_128) better than the whole path.
    source = "/".join(path.resolve().parent.parts[-2:])
    return Run(source, _parse(str(path), read_text(path, _RERUN), str(path)),
               _records(text, str(records if records.is_file() else packed)), None)


def _goodput(run: Run, row: dict[str, Any], slo: dict[str, float]) -> float | None:
    """Requests of this point meeting every bound (per request), per second of the point; None without records."""
    from pipeline.benchmark.serving import RequestRecord, meets, per_request

    if run.records is None:
        return row["goodput"] if slo == run.summary.get("settings", {}).get("slo") else None
    mine = [r for r in run.records if r["backend"] == row["backend"] and r["point"] == row["point"]]
    done = [RequestRecord(r["id"], r["prompt_len"], r["output_len"], r["send_s"], r["token_s"]) for r in mine]
    done = [r for r in done if len(r.token_s) == r.output_len]
    if not done:
        return None
    good = sum(meets(per_request(r), slo) for r in done)
    return good / row["duration_s"] if row.get("duration_s") else None


def candidates(runs: list[Run], slo: dict[str, float], price_per_hour: float | None) -> list[dict[str, Any]]:
    """Every point of every run, with its source, its goodput under `slo` and its cost."""
    rows = []
    for run in runs:
        settings = run.summary.get("settings", {})
        for row in run.summary["points"]:
            price = price_per_hour if price_per_hour is not None else run.price_per_hour
            rows.append({**row, "source": run.source, "max_num_seqs": settings.get("max_num_seqs"),
                         "slo_goodput": _goodput(run, row, slo),
                         "cost_per_million": pareto.cost_per_million(row, price)})
    return rows


def advise(rows: list[dict[str, Any]], slo: dict[str, float]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(best qualifying row or None, qualifying rows by decreasing goodput)."""
    ok = [r for r in rows if pareto.meets(r, slo)]
    ok.sort(key=lambda r: (r["slo_goodput"] if r["slo_goodput"] is not None else -1, r["output_token_throughput"]),
            reverse=True)
    return (ok[0] if ok else None), ok


def describe(row: dict[str, Any]) -> str:
    conc = f", max_num_seqs {row['max_num_seqs']}" if row.get("max_num_seqs") else ""
    return (f"{row['backend']} x {row['precision']} x tp{row.get('tp', 1)} pp{row.get('pp', 1)} at "
            f"{pareto.load_label(row)}{conc} ({row['source']})")


def by_source(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["source"]] += 1
    return dict(counts)
