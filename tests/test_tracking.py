"""MLflow tracking: what a stage run logs, nesting per invocation, deferral and backfill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import lineage, tracking
from tests.helpers import MlflowServer, copy_project, free_port, project_env, run


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A project root in tmp_path with the default sqlite store; no MLFLOW_* from the caller's shell."""
    for key in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(lineage, "invocation", lambda: ("|4242:1.000", "dvc repro"))
    return tmp_path


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "llama3-inference"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_stage_run_logs_params_metrics_artifacts_tags_under_one_parent(store, default_cfg):
    artifact = store / "metrics.json"
    artifact.write_text('{"x": 1}')
    with tracking.stage_run("weights", default_cfg) as stage:
        stage.log_metrics({"torch": {"bs1": {"tpot_ms_p50": 1.5}}, "note": "text is skipped"})
        stage.log_artifact(artifact, "benchmark")
    with tracking.stage_run("report", default_cfg):
        pass
    client, runs = _runs(tracking.resolve_uri(default_cfg.tracking))
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"weights", "report", "dvc repro"}
    parent = by_name["dvc repro"]
    weights = by_name["weights"]
    assert weights.data.tags["mlflow.parentRunId"] == parent.info.run_id == by_name["report"].data.tags["mlflow.parentRunId"]
    assert weights.data.metrics == {"torch.bs1.tpot_ms_p50": 1.5}
    assert weights.data.params["model.num_kv_heads"] == "2" and weights.data.params["benchmark.batch_sizes"] == "[1, 4]"
    assert weights.data.tags["dvc.stage"] == "weights" and "git.commit" in weights.data.tags
    assert weights.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(weights.info.run_id, "benchmark")] == ["benchmark/metrics.json"]
    assert (store / "mlflow.db").is_file() and (store / "mlruns").is_dir()


def test_failed_stage_is_logged_failed_and_the_error_propagates(store, default_cfg):
    with pytest.raises(ValueError, match="bad things"):
        with tracking.stage_run("benchmark", default_cfg):
            raise ValueError("bad things")
    _, runs = _runs(tracking.resolve_uri(default_cfg.tracking))
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["benchmark"].info.status == "FAILED"
    assert "bad things" in by_name["benchmark"].data.tags["error"]
    assert by_name["dvc repro"].info.status == "FAILED"


def test_unreachable_server_defers_and_backfill_logs_later(store, default_cfg, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    artifact = store / "report.md"
    artifact.write_text("# report v1")
    with tracking.stage_run("report", default_cfg) as stage:
        stage.log_metrics({"a": 2.0})
        stage.log_artifact(artifact, "report")
    err = capsys.readouterr().err
    assert "MLflow tracking failed" in err and "python -m pipeline backfill" in err
    pending = tracking.pending_records()
    assert len(pending) == 1
    record = json.loads((pending[0] / "record.json").read_text())
    assert record["status"] == "FINISHED" and record["metrics"] == {"a": 2.0}
    artifact.write_text("# report v2, written by a later run")  # the pending copy must be what was produced
    # Backfill into the local store (the "server" is still down, so point the URI elsewhere).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'later.db'}")
    assert tracking.backfill(default_cfg.tracking) == (1, 0)
    assert tracking.pending_records() == []
    client, runs = _runs(f"sqlite:///{store / 'later.db'}")
    report = next(r for r in runs if r.info.run_name == "report")
    assert report.data.tags["pipeline.backfilled"] == "true" and report.data.metrics == {"a": 2.0}
    local = client.download_artifacts(report.info.run_id, "report/report.md", str(store / "dl"))
    assert Path(local).read_text() == "# report v1"


def test_tracking_disabled_logs_nothing(store, default_cfg):
    import dataclasses

    cfg = dataclasses.replace(default_cfg, tracking=dataclasses.replace(default_cfg.tracking, enabled=False))
    with tracking.stage_run("weights", cfg):
        pass
    assert not (store / "mlflow.db").exists() and tracking.pending_records() == []


def test_credentials_in_uri_are_never_printed():
    assert tracking._redact("https://user:s3cret@mlflow.example.com") == "https://***@mlflow.example.com"
    assert tracking._redact("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.slow
def test_real_server_then_outage_then_backfill(tmp_path):
    """A stage against a real `mlflow server`; the same stage with the server stopped still succeeds; the
    deferred run is logged by `backfill` once the server is back."""
    project = copy_project(tmp_path / "project")
    server = MlflowServer(tmp_path, free_port())
    env = project_env(MLFLOW_TRACKING_URI=server.uri)
    server.start()
    try:
        run(["python", "-m", "stages.weights"], project, env)
        client, runs = _runs(server.uri)
        (weights,) = [r for r in runs if r.info.run_name == "weights"]
        assert weights.info.status == "FINISHED"
        assert weights.data.params["model.name"] == "tiny" and weights.data.params["precision.name"] == "fp32"
        assert weights.data.metrics["parameter_count"] == 254_528
        assert weights.data.tags["dvc.stage"] == "weights" and len(weights.data.tags["git.commit"]) == 40
        assert weights.data.tags["git.dirty"] == "false"
        assert weights.data.tags["dvc.dep.stages/weights.py"]  # the md5 DVC would record in dvc.lock
        assert [a.path for a in client.list_artifacts(weights.info.run_id, "manifests")] == ["manifests/manifest.json"]
    finally:
        server.stop()
    outage = run(["python", "-m", "stages.weights"], project, env)
    assert "MLflow tracking failed" in outage.stderr
    assert (project / "artifacts/weights/manifest.json").is_file()
    assert len(list((project / ".tracking/pending").iterdir())) == 1
    server.start()
    try:
        run(["python", "-m", "pipeline", "backfill"], project, env)
        _, runs = _runs(server.uri)
        names = sorted(r.info.run_name for r in runs)
        assert names == ["weights", "weights"]
        assert sum(r.data.tags.get("pipeline.backfilled") == "true" for r in runs) == 1
        assert list((project / ".tracking/pending").iterdir()) == []
    finally:
        server.stop()
