"""MLflow tracking. Only this module imports mlflow.

A stage collects what it produced into a StageRecord while it runs; when it ends (success or failure)
the record is published as one MLflow run, nested under the run of the `dvc repro`/`dvc exp run` that
invoked it. If MLflow is unreachable, the record and copies of its artifacts are saved under
`.tracking/pending/` and `python -m pipeline backfill` publishes them later: the DVC outputs are the
source of truth and nothing is lost.

What goes where, and why. A default `dvc repro` used to fill the runs table with 326 columns; it now
has 6 params and 68 metrics (3 backends x 4 scenarios): 39 are metrics/headline.json's (per backend and
scenario, so they grow with both), the rest are load times, small stage metrics and system metrics.
- Runs are named from the config: the invocation run `tiny fp32 tp1pp1` (`<exp> · tiny fp32 tp1pp1`
  under `dvc exp run -n <exp>`), its stage runs `benchmark · tiny fp32 tp1pp1`.
- Params: only HEADLINE_PARAMS plus the keys whose values differ from what conf/ composes to with no
  overrides, so an experiment's row shows what it changed (`benchmark.measured_runs`). The `tracking`
  section is never a param (not an experiment setting, and a URI may carry credentials). The full
  params.yaml (credentials in URIs masked) is an artifact of every run. If conf/ cannot be composed,
  every key is logged, as before, and the `pipeline.params` tag says why.
- Metrics: a stage's metrics as given, unless they are per-item detail (more than MAX_RUN_METRICS
  numbers: benchmark per backend x scenario, evaluate per artifact, verify_parallel per format); then
  only the leaves named in HEADLINE_METRICS, and the stage keeps the whole file as its artifact.
- The invocation run has the headline params and, refreshed whenever any of its stages publishes,
  the metrics of the files on disk: metrics/headline.json and any other metrics file dvc.yaml declares
  (reduced as above, so the columns are the stage runs' columns), i.e. what `dvc exp show` shows. DVC
  skips unchanged stages without running them, so only the files on disk make the invocation run
  complete. They are read when a stage ends and kept in its record, so a backfilled record does not
  pick up a later run's numbers.
- Benchmark runs carry MLflow's system metrics (`system/cpu_utilization_percentage`, memory, and
  `system/gpu_<i>_*` where NVML/ROCm works), sampled with MLflow's own monitors during the stage into
  the record and logged as metric history when the record is published (possibly by backfill).
  Disk and network monitors are left out: they say nothing about inference and add columns."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import artifacts, lineage, paths
from pipeline.config import PipelineConfig, TrackingConfig, flatten
from pipeline.errors import redact
from pipeline.progress import console
from pipeline.report import headline

PENDING_DIR = ".tracking/pending"
INVOCATION_TAG = "pipeline.invocation"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
HEADLINE_PARAMS = ("model.name", "precision.name", "parallel.tp", "parallel.pp", "benchmark.backends",
                   "calibration.method")
# The numbers compared across runs: what metrics/headline.json holds (latency and throughput per
# backend and scenario, accuracy cost), plus model load time and the worst logit difference of the
# parallel checkpoints.
HEADLINE_METRICS = (*headline.HEADLINE_METRICS, "load_s", "logits_max_abs_diff")
MAX_RUN_METRICS = 12  # more numbers than this from one stage is per-item detail: keep HEADLINE_METRICS
SYSTEM_METRICS_STAGES = ("benchmark",)
SYSTEM_METRICS_INTERVAL_S = 3.0  # MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
CONF_DIR = Path("conf")


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
    # Added later; the defaults keep records saved by older versions loadable by backfill.
    run_name: str = ""
    invocation_metrics: dict[str, float] = field(default_factory=dict)  # metrics files on disk at stage end
    config_yaml: str | None = None  # params.yaml as the stage read it, credentials masked
    system_metrics: list[list] = field(default_factory=list)  # [key, value, timestamp_ms, step]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        return cls(**data)


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def reduce_metrics(values: dict[str, float], names: tuple[str, ...] = HEADLINE_METRICS) -> dict[str, float]:
    """Keep a stage's numbers, unless there are more than MAX_RUN_METRICS: then only the leaves named `names`."""
    if len(values) <= MAX_RUN_METRICS:
        return dict(values)
    return {k: v for k, v in values.items() if k.rsplit(".", 1)[-1] in names}


class StageRun:
    """What a stage hands results to; see `stage_run`."""

    def __init__(self, record: StageRecord):
        self.record = record

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "", names: tuple[str, ...] = HEADLINE_METRICS) -> None:
        """Log numbers (nested dicts flattened); past MAX_RUN_METRICS only the leaves named `names`."""
        values = numeric(metrics, prefix)
        kept = reduce_metrics(values, names)
        if len(kept) < len(values):
            self.record.tags["pipeline.metrics"] = (f"{len(kept)} of {len(values)} numbers logged "
                                                    f"({', '.join(names)}); the metrics file has all")
        self.record.metrics.update(kept)

    def log_artifact(self, path: str | Path, artifact_dir: str = "") -> None:
        self.record.artifacts.append({"path": str(Path(path).resolve()), "dir": artifact_dir})

    def log_manifest(self, manifest_dir: str | Path, artifact_dir: str = "manifests") -> None:
        self.log_artifact(Path(manifest_dir) / "manifest.json", artifact_dir)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.record.tags.update({k: str(v) for k, v in tags.items()})


def run_label(cfg: PipelineConfig) -> str:
    return f"{cfg.model.name} {cfg.precision.name} tp{cfg.parallel.tp}pp{cfg.parallel.pp}"


@contextlib.contextmanager
def stage_run(stage: str, cfg: PipelineConfig) -> Iterator[StageRun]:
    """Collect a stage's results; publish them (or defer them) when the block ends, also on failure."""
    key, command = lineage.invocation()
    label = run_label(cfg)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"dvc.stage": stage, "pipeline.command": command, **lineage.git_state()}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    record = StageRecord(stage=stage, params={}, tags=tags, invocation=key,
                         invocation_name=f"{exp_name} · {label}" if exp_name else label,
                         run_name=f"{stage} · {label}", start_ms=_now_ms())
    sampler = None
    if cfg.tracking.enabled:
        record.params = logged_params(cfg, record.tags)
        if stage in SYSTEM_METRICS_STAGES:
            sampler = SystemSampler.start(record)
    run = StageRun(record)
    try:
        yield run
    except BaseException as e:
        record.status, record.error = "FAILED", redact(f"{type(e).__name__}: {e}")
        record.tags["error"] = record.error[:5000]
        raise
    else:
        record.status = "FINISHED"
    finally:
        if sampler is not None:
            sampler.stop()
        record.end_ms = _now_ms()
        if cfg.tracking.enabled:
            # Hashed when the stage ends, as DVC does for dvc.lock right after the command exits.
            record.tags.update({f"dvc.dep.{p}": md5 for p, md5 in lineage.dependency_hashes(stage).items()})
            record.invocation_metrics = invocation_metrics(Path.cwd())
            record.config_yaml = _config_text(cfg)
            publish_or_defer(record, cfg.tracking)


def logged_params(cfg: PipelineConfig, tags: dict[str, str]) -> dict[str, Any]:
    """HEADLINE_PARAMS plus what differs from conf/'s defaults; every key if conf/ cannot be composed."""
    everything = {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith("tracking.")}
    changed, why = lineage.config_changes(cfg.to_dict(), CONF_DIR)
    if changed is None:
        tags["pipeline.params"] = f"all keys (no conf/ defaults to compare with: {why})"
        changed = everything
    params = {k: everything[k] for k in HEADLINE_PARAMS if k in everything}
    params["benchmark.backends"] = ",".join(cfg.benchmark.backends)
    params.update({k: v for k, v in changed.items() if k in everything and k not in params})
    return params


def invocation_metrics(workdir: Path) -> dict[str, float]:
    """Every declared metrics file on disk, reduced as a stage's are, then metrics/headline.json."""
    head = workdir / paths.HEADLINE_METRICS
    values: dict[str, float] = {}
    for path in [p for p in lineage.metrics_files(workdir) if p != head] + [head]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not produced yet, or being rewritten: the next stage's refresh picks it up
        if isinstance(data, dict):
            found = numeric(data)
            values.update(found if path == head else reduce_metrics(found))
    return values


def _config_text(cfg: PipelineConfig) -> str:
    try:
        text = paths.PARAMS.read_text()
    except OSError:  # a library call without params.yaml: the validated config it ran with
        import yaml

        text = "# params.yaml not found; the config this stage ran with:\n"
        text += yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return redact(text)


class SystemSampler:
    """MLflow's CPU monitor (and GPU monitor where NVML/ROCm works) sampled on a daemon thread; `stop`
    hands the samples to the record. Best effort: a failure stops sampling and leaves a tag, never fails
    the stage."""

    def __init__(self, record: StageRecord, monitors: list, interval_s: float):
        self.record, self.monitors, self.interval_s = record, monitors, interval_s
        self._stop = threading.Event()
        self._samples: list[list] = []  # [key, value, timestamp_ms, step]; only the thread appends
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    @classmethod
    def start(cls, record: StageRecord) -> SystemSampler | None:
        try:
            from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

            monitors = [CPUMonitor(), *_gpu_monitors()]
            sampler = cls(record, monitors, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or SYSTEM_METRICS_INTERVAL_S)
            sampler._thread.start()
            return sampler
        except Exception as e:
            record.tags["pipeline.system_metrics"] = f"not sampled: {_first_line(e)}"
            return None

    def _loop(self) -> None:
        # psutil measures CPU use since the previous call *in the same thread*: the first call only sets
        # that start point, and every sample, the last one included, is taken in this thread.
        if not self._collect("not sampled"):
            return
        while True:
            stopping = self._stop.wait(self.interval_s)
            if not self._collect("sampling stopped", record=True) or stopping:
                return

    def _collect(self, failure: str, record: bool = False) -> bool:
        try:
            values: dict[str, float] = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        except Exception as e:
            self._failure = f"{failure}: {_first_line(e)}"[:500]
            return False
        if record:
            now, step = _now_ms(), (self._samples[-1][3] + 1 if self._samples else 0)
            self._samples.extend([f"system/{k}", float(v), now, step] for k, v in sorted(values.items()))
        return True

    def stop(self) -> None:
        """Take the last sample (so that a stage shorter than the interval has one too) and end the thread."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 10)
        if self._thread.is_alive():
            self._failure = f"sampling stopped: a monitor did not answer within {self.interval_s + 10:.0f} s"
        self.record.system_metrics = list(self._samples)
        if self._failure:
            self.record.tags["pipeline.system_metrics"] = self._failure


def _gpu_monitors() -> list:
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for monitor in (GPUMonitor, ROCMMonitor):  # the order SystemMetricsMonitor tries them in
        try:
            return [monitor()]
        except Exception:  # no driver, no GPU or no pynvml/pyrsmi: CPU metrics only
            continue
    return []


def _now_ms() -> int:
    return int(time.time() * 1000)


def resolve_uri(tracking: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then a sqlite store in the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    return uri or f"sqlite:///{lineage.project_root() / 'mlflow.db'}"


# Credentials for the tracking server come from the environment, the way MLflow reads them
# (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or ~/.mlflow/credentials);
# params.yaml refuses them (pipeline/config.py). MLFLOW_TRACKING_URI may carry user:password@ (it is not
# committed): `_client_uri` moves them into those variables for the publish only.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@contextlib.contextmanager
def _client_uri(uri: str) -> Iterator[str]:
    """The URI handed to MLflow (and the health probe): an http(s) URI without userinfo, query or fragment.
    MLflow appends its API paths to the URI and sends credentials only as an Authorization header, so a
    query string would break every request and userinfo would be ignored (and printed in its errors). The
    userinfo becomes MLFLOW_TRACKING_USERNAME/PASSWORD in this process while the block runs, never logged
    (errors.redact masks them in any text while they are set)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        yield uri
        return
    host = parts.netloc.rpartition("@")[2]
    saved = {k: os.environ.get(k) for k in CREDENTIAL_VARS}
    if "@" in parts.netloc:
        user, _, password = parts.netloc.rpartition("@")[0].partition(":")
        os.environ.update(zip(CREDENTIAL_VARS, (urllib.parse.unquote(user), urllib.parse.unquote(password))))
    try:
        yield urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_reachable(uri: str, timeout_s: float) -> None:
    """GET /health with MLflow's own HTTP client and credentials (basic auth, bearer token, TLS settings), so
    the probe succeeds exactly when the client will. `uri` is a `_client_uri`."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, backoff_factor=0,
                                timeout=timeout_s, raise_on_status=False)
    except Exception as e:
        # MLflow wraps the requests error in a long message; the OS error at its end is what says why.
        cause = re.findall(r"\[Errno -?\d+\][^'\")]*|(?:Read |Connect )?timed out", str(e))
        raise ConnectionError(f"{redact(uri)} unreachable ({redact(cause[-1]) if cause else _first_line(e)})") from None
    if response.status_code in (401, 403):
        raise ConnectionError(f"{redact(uri)} refused the credentials (HTTP {response.status_code}); set "
                              f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if response.status_code != 200:
        raise ConnectionError(f"{redact(uri)}/health answered HTTP {response.status_code}")


def publish_or_defer(record: StageRecord, tracking: TrackingConfig) -> None:
    try:
        with _client_uri(resolve_uri(tracking)) as uri:
            _check_reachable(uri, tracking.timeout_s)
            run_id = publish(record, tracking.experiment, uri, tracking.timeout_s)
        console.print(f"[dim]mlflow: stage '{record.stage}' logged as run {run_id} at {redact(uri)}[/dim]")
    except Exception as e:
        where = save_pending(record)
        console.print(f"[yellow]warning: MLflow tracking failed ({_first_line(e)}); the stage's outputs are written "
                      f"and its run is saved in {where}. Run `python -m pipeline backfill` once MLflow is "
                      f"reachable.[/yellow]")


def _first_line(e: BaseException) -> str:
    return redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else ''}")


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


def _params(record: StageRecord) -> list:
    from mlflow.entities import Param

    return [Param(k, redact(json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:MAX_PARAM_LENGTH])
            for k, v in sorted(record.params.items())]


def _log_config(client, run_id: str, record: StageRecord) -> None:
    if record.config_yaml is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(record.config_yaml)
        client.log_artifact(run_id, str(path))


def _parent_run(client, experiment_id: str, record: StageRecord, git_tags: dict[str, str]) -> str | None:
    if record.invocation is None:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    query = f"tags.`{INVOCATION_TAG}` = '{record.invocation}' and tags.`pipeline.kind` = 'invocation'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {INVOCATION_TAG: record.invocation, "pipeline.kind": "invocation", MLFLOW_RUN_NAME: record.invocation_name,
            **{k: redact(record.tags[k]) for k in ("pipeline.command", "dvc.exp_name", "pipeline.params")
               if k in record.tags},
            **git_tags}
    run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.invocation_name, tags=tags)
    try:
        # Params are fixed for the invocation (one params.yaml), so the first stage to publish sets them.
        params = _params(record)
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        _log_config(client, run.info.run_id, record)
    except Exception:
        with contextlib.suppress(Exception):
            client.delete_run(run.info.run_id)
        raise
    return run.info.run_id


def _refresh_parent(client, parent_id: str, record: StageRecord) -> None:
    """Log the on-disk metrics that changed. Stamped with the stage's end time, so a record backfilled
    after a newer one adds history without replacing the newer values MLflow shows."""
    from mlflow.entities import Metric

    current = client.get_run(parent_id).data.metrics
    changed = [Metric(k, v, record.end_ms or record.start_ms, 0)
               for k, v in sorted(record.invocation_metrics.items()) if current.get(k) != v]
    for i in range(0, len(changed), 1000):
        client.log_batch(parent_id, metrics=changed[i:i + 1000])


def publish(record: StageRecord, experiment: str, uri: str, timeout_s: float = 5.0) -> str:
    """Log one stage record as an MLflow run (nested under its invocation's run). Returns the run id."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    _configure_client_env(timeout_s)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri)
    git_tags = {k: v for k, v in record.tags.items() if k.startswith("git.")}
    parent_id = _parent_run(client, experiment_id, record, git_tags)
    tags = {k: redact(str(v)) for k, v in record.tags.items()}
    tags["pipeline.kind"] = "stage"
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    if record.invocation:
        tags[INVOCATION_TAG] = record.invocation
    run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.run_name or record.stage,
                            tags=tags)
    run_id = run.info.run_id
    try:
        params = _params(record)
        metrics = [Metric(k, v, record.end_ms or record.start_ms, 0) for k, v in sorted(record.metrics.items())]
        metrics += [Metric(k, v, ts, step) for k, v, ts, step in record.system_metrics]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for artifact in record.artifacts:
            client.log_artifact(run_id, artifact["path"], artifact_path=artifact["dir"] or None)
        _log_config(client, run_id, record)
        client.set_terminated(run_id, status=record.status, end_time=record.end_ms)
        if parent_id:
            _refresh_parent(client, parent_id, record)
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
    # atomic_dir: a record half-saved by a killed stage stays an unlocked `.partial`, which the next stage sweeps.
    with artifacts.atomic_dir(root / name) as partial:
        (partial / "artifacts").mkdir()
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
        (partial / "record.json").write_text(redact(json.dumps(data, indent=2)) + "\n")
    return root / name


def pending_records(root: Path | None = None) -> list[Path]:
    base = (root or lineage.project_root()) / PENDING_DIR
    return sorted(p for p in base.glob("*") if p.is_dir() and not p.name.endswith(".partial")) if base.is_dir() else []


def backfill(tracking: TrackingConfig) -> tuple[int, int]:
    """Publish every pending record; returns (published, still pending)."""
    with _client_uri(resolve_uri(tracking)) as uri:
        _check_reachable(uri, tracking.timeout_s)
        return _backfill(tracking, uri)


def _backfill(tracking: TrackingConfig, uri: str) -> tuple[int, int]:
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
            console.print(f"[red]could not backfill {folder}:[/red] {_first_line(e)}")
            continue
        shutil.rmtree(folder)
        done += 1
        console.print(f"backfilled {folder.name} -> run {run_id}")
    return done, len(records) - done
