"""MLflow tracking. Only this module imports mlflow.

A stage collects what it produced into a StageRecord while it runs; when it ends (success or failure)
the record is published as one MLflow run, nested under the run of the `dvc repro`/`dvc exp run` that
invoked it. If MLflow is unreachable, the record and copies of its artifacts are saved under
`.tracking/pending/` and `python -m pipeline backfill` publishes them later: the DVC outputs are the
source of truth and nothing is lost."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline import lineage
from pipeline.config import PipelineConfig, TrackingConfig, flatten
from pipeline.progress import console

PENDING_DIR = ".tracking/pending"
INVOCATION_TAG = "pipeline.invocation"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


@dataclass
class StageRecord:
    stage: str
    params: dict[str, Any]
    tags: dict[str, str]
    invocation: str | None
    invocation_name: str
    start_ms: int
    end_ms: int | None = None
    status: str = "RUNNING"
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[dict[str, str]] = field(default_factory=list)  # {"path": local file, "dir": artifact dir}
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageRecord":
        return cls(**data)


class StageRun:
    """What a stage hands results to; see `stage_run`."""

    def __init__(self, record: StageRecord):
        self.record = record

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        for key, value in flatten(metrics).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.record.metrics[f"{prefix}{key}"] = float(value)

    def log_artifact(self, path: str | Path, artifact_dir: str = "") -> None:
        self.record.artifacts.append({"path": str(Path(path).resolve()), "dir": artifact_dir})

    def log_manifest(self, manifest_dir: str | Path, artifact_dir: str = "manifests") -> None:
        self.log_artifact(Path(manifest_dir) / "manifest.json", artifact_dir)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.record.tags.update({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def stage_run(stage: str, cfg: PipelineConfig) -> Iterator[StageRun]:
    """Collect a stage's results; publish them (or defer them) when the block ends, also on failure."""
    key, name = lineage.invocation()
    tags = {"dvc.stage": stage, **lineage.git_state()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    record = StageRecord(stage=stage, params=flatten(cfg.to_dict()), tags=tags, invocation=key,
                         invocation_name=name, start_ms=_now_ms())
    run = StageRun(record)
    try:
        yield run
    except BaseException as e:
        record.status, record.error = "FAILED", f"{type(e).__name__}: {e}"
        record.tags["error"] = record.error[:5000]
        raise
    else:
        record.status = "FINISHED"
    finally:
        record.end_ms = _now_ms()
        if cfg.tracking.enabled:
            # Hashed when the stage ends, as DVC does for dvc.lock right after the command exits.
            record.tags.update({f"dvc.dep.{p}": md5 for p, md5 in lineage.dependency_hashes(stage).items()})
            publish_or_defer(record, cfg.tracking)


def _now_ms() -> int:
    return int(time.time() * 1000)


def resolve_uri(tracking: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then a sqlite store in the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    return uri or f"sqlite:///{lineage.project_root() / 'mlflow.db'}"


def _check_reachable(uri: str, timeout_s: float) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise ConnectionError(f"/health answered {response.status}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"{uri} unreachable ({getattr(e, 'reason', e)})") from None


def publish_or_defer(record: StageRecord, tracking: TrackingConfig) -> None:
    uri = resolve_uri(tracking)
    try:
        _check_reachable(uri, tracking.timeout_s)
        run_id = publish(record, tracking.experiment, uri, tracking.timeout_s)
        console.print(f"[dim]mlflow: stage '{record.stage}' logged as run {run_id} at {_redact(uri)}[/dim]")
    except Exception as e:
        where = save_pending(record)
        console.print(f"[yellow]warning: MLflow tracking failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      f"the stage's outputs are written and its run is saved in {where}. Run "
                      f"`python -m pipeline backfill` once MLflow is reachable.[/yellow]")


def _redact(uri: str) -> str:
    # A URI may carry credentials (https://user:token@host); never print them.
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _configure_client_env(timeout_s: float) -> None:
    # mlflow's HTTP client retries with backoff for minutes by default; the /health probe has already
    # shown the server is up, so a few quick retries are enough.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(10, int(timeout_s * 4))))


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the db in the project root, whatever directory the stage ran in.
        location = (lineage.project_root() / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _parent_run(client, experiment_id: str, record: StageRecord, git_tags: dict[str, str]) -> str | None:
    if record.invocation is None:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    query = f"tags.`{INVOCATION_TAG}` = '{record.invocation}' and tags.`pipeline.kind` = 'invocation'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.invocation_name,
                            tags={INVOCATION_TAG: record.invocation, "pipeline.kind": "invocation",
                                  MLFLOW_RUN_NAME: record.invocation_name, **git_tags})
    return run.info.run_id


def publish(record: StageRecord, experiment: str, uri: str, timeout_s: float = 5.0) -> str:
    """Log one stage record as an MLflow run (nested under its invocation's run). Returns the run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    _configure_client_env(timeout_s)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri)
    git_tags = {k: v for k, v in record.tags.items() if k.startswith("git.")}
    parent_id = _parent_run(client, experiment_id, record, git_tags)
    tags = {k: str(v) for k, v in record.tags.items()}
    tags["pipeline.kind"] = "stage"
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    if record.invocation:
        tags[INVOCATION_TAG] = record.invocation
    run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.stage, tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in sorted(record.params.items())]
        params = [Param(p.key, p.value[:MAX_PARAM_LENGTH]) for p in params]
        metrics = [Metric(k, v, record.end_ms or record.start_ms, 0) for k, v in sorted(record.metrics.items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for artifact in record.artifacts:
            client.log_artifact(run_id, artifact["path"], artifact_path=artifact["dir"] or None)
        client.set_terminated(run_id, status=record.status, end_time=record.end_ms)
        if parent_id:
            # The invocation run ends when its latest stage ends; a failed stage fails it.
            parent_status = "FAILED" if record.status == "FAILED" else "FINISHED"
            client.set_terminated(parent_id, status=parent_status, end_time=record.end_ms)
            client.log_batch(parent_id, tags=[RunTag(f"stage.{record.stage}", run_id)])
    except Exception:
        # Half-logged runs would be duplicated by backfill: remove this one and let the caller defer.
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise
    return run_id


def save_pending(record: StageRecord) -> Path:
    """Keep the record and copies of its artifacts (later runs may overwrite the originals)."""
    root = lineage.project_root() / PENDING_DIR
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{record.stage}-{uuid.uuid4().hex[:8]}"
    partial = root / f"{name}.partial"
    (partial / "artifacts").mkdir(parents=True)
    saved = []
    for i, artifact in enumerate(record.artifacts):
        src = Path(artifact["path"])
        if src.is_file():
            copy = partial / "artifacts" / f"{i:03d}" / src.name
            copy.parent.mkdir()
            shutil.copy2(src, copy)
            saved.append({"path": str(copy.relative_to(partial)), "dir": artifact["dir"]})
    data = record.to_json()
    data["artifacts"] = saved
    (partial / "record.json").write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, root / name)
    return root / name


def pending_records(root: Path | None = None) -> list[Path]:
    base = (root or lineage.project_root()) / PENDING_DIR
    return sorted(p for p in base.glob("*") if p.is_dir() and not p.name.endswith(".partial")) if base.is_dir() else []


def backfill(tracking: TrackingConfig) -> tuple[int, int]:
    """Publish every pending record; returns (published, still pending)."""
    uri = resolve_uri(tracking)
    _check_reachable(uri, tracking.timeout_s)
    done = 0
    records = pending_records()
    for folder in records:
        try:
            data = json.loads((folder / "record.json").read_text())
            for artifact in data["artifacts"]:
                artifact["path"] = str(folder / artifact["path"])
            record = StageRecord.from_json(data)
            record.tags["pipeline.backfilled"] = "true"
            run_id = publish(record, tracking.experiment, uri, tracking.timeout_s)
        except Exception as e:  # keep going: one bad record must not hold back the others
            console.print(f"[red]could not backfill {folder}:[/red] {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        shutil.rmtree(folder)
        done += 1
        console.print(f"backfilled {folder.name} -> run {run_id}")
    return done, len(records) - done


