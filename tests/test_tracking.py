"""MLflow tracking: what a stage run logs, nesting per invocation, deferral and backfill."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline import lineage, tracking
from pipeline.errors import redact
from pipeline.report import headline
from tests.helpers import MlflowServer, copy_project, free_port, project_env, run

LABEL = "tiny fp32 tp1pp1"
# What each stage writes, as dvc.yaml declares it (convert_ft and convert_trtllm write no metrics).
METRICS_FILES = {"weights": "metrics/weights.json", "export_onnx": "metrics/export_onnx.json",
                 "calibrate": "metrics/calibrate.json", "evaluate": "metrics/evaluate.json",
                 "verify_parallel": "metrics/verify_parallel.json", "benchmark": "metrics/benchmark.json",
                 "report": "metrics/headline.json"}
PIPELINE = ("weights", "export_onnx", "calibrate", "evaluate", "convert_ft", "convert_trtllm", "verify_parallel",
            "benchmark", "report")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "llama3-inference"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _local_runs(store: Path):
    return _runs(f"sqlite:///{store / 'mlflow.db'}")


def _headline_params(cfg) -> dict[str, str]:
    return {"model.name": cfg.model.name, "precision.name": cfg.precision.name, "parallel.tp": str(cfg.parallel.tp),
            "parallel.pp": str(cfg.parallel.pp), "benchmark.backends": ",".join(cfg.benchmark.backends),
            "calibration.method": cfg.calibration.method}


def _outputs(cfg, scale: float = 1.0) -> dict[str, dict]:
    """Metrics of every stage with the shapes the stages write for `cfg`; `scale` changes the numbers."""
    scenarios = [f"bs{b}_in{p}_out{cfg.benchmark.output_length}" for p in cfg.benchmark.prompt_lengths
                 for b in cfg.benchmark.batch_sizes]
    stats = [f"{m}_{s}" for m in ("ttft_ms", "tpot_ms", "e2el_ms") for s in ("mean", "p50", "p90", "p99")]
    benchmark = {b: {"load_s": 1.5 * scale, **{s: {**{k: (i + 1) * scale for i, k in enumerate(stats)},
                                                    "output_token_throughput": 1000 / scale, "request_throughput": 30.0,
                                                    "peak_memory_mb": 440.0} for s in scenarios}}
                 for b in cfg.benchmark.backends}
    evaluate = {a: {"ppl": 92.4, "ppl_delta_pct": 0.05 * scale, "top1_agreement": 0.99, "kl_mean": 1e-5, "gate_pass": 1}
                for a in ("torch_fp32", "torch_fp16", "torch_bf16", "onnx_fp32", "onnx_int8")}
    evaluate.update(reference_ppl=92.4, scored_positions=441)
    verify = {f: {"logits_max_abs_diff": 1.7e-6, "top1_agreement": 1.0, "generation_token_exact": 1, "gate_pass": 1,
                  "torchrun_wall_s": 3.3} for f in ("ft", "trtllm")}
    verify["layout"] = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "world_size": cfg.parallel.world_size}
    conditions = {b: {"precision": cfg.precision.name} for b in cfg.benchmark.backends}
    return {"weights": {"parameter_count": 254528, "bytes": 1044535, "seconds": 5.4 * scale},
            "export_onnx": {"prefill_max_abs_diff": 1.7e-6, "prefill_top1_agreement": 1.0, "decode_max_abs_diff": 1.4e-6,
                            "decode_top1_agreement": 1.0, "parity_positions": 66, "nodes_before": 346,
                            "nodes_after_ort": 326, "stage_s": 9.0},
            "calibrate": {"calibration_feeds": 32, "quantized_activations": 33, "quantize_linear_nodes": 33,
                          "dequantize_linear_nodes": 62, "excluded_nodes": 0},
            "evaluate": evaluate, "verify_parallel": verify, "benchmark": benchmark,
            "report": headline.headline(benchmark, conditions, evaluate)}


def _repro(cfg, stages, outputs: dict[str, dict]) -> None:
    """What `dvc repro` does for the stages it does not skip: each writes its metrics file and logs it."""
    for name in stages:
        with tracking.stage_run(name, cfg) as stage:
            if name in METRICS_FILES:
                path = Path(METRICS_FILES[name])
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(outputs[name]))
                stage.log_metrics(outputs[name])
                stage.log_artifact(path, name)


def test_stage_run_logs_params_metrics_artifacts_tags_under_one_parent(store, default_cfg):
    artifact = store / "metrics.json"
    artifact.write_text('{"x": 1}')
    with tracking.stage_run("weights", default_cfg) as stage:
        stage.log_metrics({"torch": {"bs1": {"tpot_ms_p50": 1.5}}, "note": "text is skipped"})
        stage.log_artifact(artifact, "benchmark")
    with tracking.stage_run("report", default_cfg):
        pass
    client, runs = _local_runs(store)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"weights · {LABEL}", f"report · {LABEL}", LABEL}
    parent, weights = by_name[LABEL], by_name[f"weights · {LABEL}"]
    assert weights.data.tags["mlflow.parentRunId"] == parent.info.run_id == by_name[f"report · {LABEL}"].data.tags["mlflow.parentRunId"]
    assert parent.data.tags["pipeline.kind"] == "invocation" and parent.data.tags["pipeline.command"] == "dvc repro"
    assert weights.data.tags["pipeline.kind"] == "stage"
    assert weights.data.metrics == {"torch.bs1.tpot_ms_p50": 1.5}
    # The default config: only the headline params, on the stage runs and on the invocation run.
    assert weights.data.params == parent.data.params == _headline_params(default_cfg)
    assert weights.data.tags["dvc.stage"] == "weights" and "git.commit" in weights.data.tags
    assert weights.info.status == parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(weights.info.run_id, "benchmark")] == ["benchmark/metrics.json"]
    for run_id in (weights.info.run_id, parent.info.run_id):  # the full config is an artifact of each
        local = client.download_artifacts(run_id, "params.yaml", str(store / "dl" / run_id))
        assert Path(local).read_text() == (store / "params.yaml").read_text()
    assert (store / "mlflow.db").is_file() and (store / "mlruns").is_dir()


def test_parent_run_has_headline_params_and_the_headline_metrics_on_disk(store, default_cfg):
    (store / "metrics").mkdir()
    (store / "metrics/headline.json").write_text(json.dumps(
        {"torch": {"ppl_delta_pct": 0.0, "bs1_in32_out32": {"ttft_ms_p50": 1.4, "tpot_ms_p50": 0.93,
                                                            "output_token_throughput": 1060.2}},
         "onnxruntime": {"ppl_delta_pct": -1.7e-06, "bs1_in32_out32": {"ttft_ms_p50": 2.1, "tpot_ms_p50": 1.2,
                                                                        "output_token_throughput": 800.5}}}))
    with tracking.stage_run("convert_ft", default_cfg):  # a stage that logs no metrics of its own
        pass
    _, runs = _local_runs(store)
    (parent,) = [r for r in runs if r.data.tags["pipeline.kind"] == "invocation"]
    assert parent.data.params == _headline_params(default_cfg)
    assert parent.data.metrics == {"torch.ppl_delta_pct": 0.0, "torch.bs1_in32_out32.ttft_ms_p50": 1.4,
                                   "torch.bs1_in32_out32.tpot_ms_p50": 0.93,
                                   "torch.bs1_in32_out32.output_token_throughput": 1060.2,
                                   "onnxruntime.ppl_delta_pct": -1.7e-06, "onnxruntime.bs1_in32_out32.ttft_ms_p50": 2.1,
                                   "onnxruntime.bs1_in32_out32.tpot_ms_p50": 1.2,
                                   "onnxruntime.bs1_in32_out32.output_token_throughput": 800.5}


def test_runs_are_named_from_the_config_and_the_experiment(store, default_cfg, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "fewer-runs")
    cfg = dataclasses.replace(default_cfg, precision=dataclasses.replace(default_cfg.precision, name="bf16"),
                              parallel=dataclasses.replace(default_cfg.parallel, tp=2),
                              benchmark=dataclasses.replace(default_cfg.benchmark, measured_runs=3))
    with tracking.stage_run("benchmark", cfg):
        pass
    _, runs = _local_runs(store)
    by_kind = {r.data.tags["pipeline.kind"]: r for r in runs}
    assert by_kind["invocation"].info.run_name == "fewer-runs · tiny bf16 tp2pp1"
    assert by_kind["stage"].info.run_name == "benchmark · tiny bf16 tp2pp1"
    assert by_kind["invocation"].data.tags["dvc.exp_name"] == by_kind["stage"].data.tags["dvc.exp_name"] == "fewer-runs"
    # What the experiment changed relative to conf/ is a param; nothing else beyond the headline is.
    expected = {**_headline_params(cfg), "benchmark.measured_runs": "3"}
    assert by_kind["stage"].data.params == by_kind["invocation"].data.params == expected


def test_without_conf_every_key_is_a_param_and_the_tag_says_why(store, default_cfg):
    shutil.rmtree(store / "conf")
    with tracking.stage_run("weights", default_cfg):
        pass
    _, runs = _local_runs(store)
    (stage,) = [r for r in runs if r.data.tags["pipeline.kind"] == "stage"]
    assert stage.data.params["benchmark.batch_sizes"] == json.dumps(default_cfg.benchmark.batch_sizes)
    assert stage.data.params["model.num_kv_heads"] == str(default_cfg.model.num_kv_heads)
    assert not any(k.startswith("tracking.") for k in stage.data.params)
    assert "conf/config.yaml not found" in stage.data.tags["pipeline.params"]


def test_invocation_run_is_complete_whatever_subset_of_stages_reran(store, default_cfg, monkeypatch):
    first = _outputs(default_cfg)
    _repro(default_cfg, PIPELINE, first)
    # weights reruns (its code changed) and writes byte-identical outputs, so DVC skips everything downstream.
    monkeypatch.setattr(lineage, "invocation", lambda: ("|4343:2.000", "dvc repro"))
    _repro(default_cfg, ("weights",), first)
    # A benchmark param changed: benchmark and report rerun, the rest is skipped (its code never runs).
    monkeypatch.setattr(lineage, "invocation", lambda: ("|4444:3.000", "dvc repro"))
    second = _outputs(default_cfg, scale=2.0)
    _repro(default_cfg, ("benchmark", "report"), second)
    _, runs = _local_runs(store)
    parents = {r.data.tags[tracking.INVOCATION_TAG]: r for r in runs if r.data.tags["pipeline.kind"] == "invocation"}
    full, weights_only, bench_only = parents["|4242:1.000"], parents["|4343:2.000"], parents["|4444:3.000"]
    assert [sum(r.data.tags.get("mlflow.parentRunId") == p.info.run_id for r in runs)
            for p in (full, weights_only, bench_only)] == [len(PIPELINE), 1, 2]
    headline_first, headline_second = tracking.numeric(first["report"]), tracking.numeric(second["report"])
    assert {k: full.data.metrics[k] for k in headline_first} == headline_first
    assert weights_only.data.metrics == full.data.metrics  # from the files on disk, no report run needed
    assert set(bench_only.data.metrics) == set(full.data.metrics)
    assert {k: bench_only.data.metrics[k] for k in headline_second} == headline_second != headline_first
    # Large per-item detail is reduced to the headline names; the stage keeps the full file as an artifact.
    bench = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == bench_only.info.run_id
                 and r.data.tags["dvc.stage"] == "benchmark")
    assert {k.rsplit(".", 1)[1] for k in bench.data.metrics if not k.startswith("system/")} == \
        {"load_s", "ttft_ms_p50", "tpot_ms_p50", "output_token_throughput"}
    assert "the metrics file has all" in bench.data.tags["pipeline.metrics"]


def test_invocation_metrics_are_the_declared_metrics_files_on_disk(tmp_path, default_cfg):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  weights: {cmd: x, metrics: [metrics/weights.json: {cache: false}]}\n"
        "  evaluate: {cmd: x, metrics: [metrics/evaluate.json]}\n"
        "  calibrate: {cmd: x, outs: [metrics/calibrate.json]}\n"  # an output, not declared as metrics
        "metrics: [metrics/verify_parallel.json, metrics/missing.json]\n")
    outputs = _outputs(default_cfg)
    (tmp_path / "metrics").mkdir()
    for stage in ("weights", "evaluate", "calibrate", "verify_parallel", "report"):
        (tmp_path / METRICS_FILES[stage]).write_text(json.dumps(outputs[stage]))
    assert lineage.metrics_files(tmp_path) == [tmp_path / f"metrics/{n}.json"
                                               for n in ("weights", "evaluate", "verify_parallel", "missing")]
    values = tracking.invocation_metrics(tmp_path)
    # Small files as they are, large ones reduced to HEADLINE_METRICS, headline.json whether declared or not.
    expected = {**tracking.numeric(outputs["weights"]),
                **{f"{a}.ppl_delta_pct": 0.05 for a in ("torch_fp32", "torch_fp16", "torch_bf16", "onnx_fp32", "onnx_int8")},
                "ft.logits_max_abs_diff": 1.7e-6, "trtllm.logits_max_abs_diff": 1.7e-6,
                **tracking.numeric(outputs["report"])}
    assert values == expected
    assert lineage.metrics_files(tmp_path / "elsewhere") == [] and tracking.invocation_metrics(tmp_path / "elsewhere") == {}


def test_a_default_repro_fills_few_runs_table_columns(store, default_cfg):
    _repro(default_cfg, PIPELINE, _outputs(default_cfg))
    _, runs = _local_runs(store)
    params = {k for r in runs for k in r.data.params}
    metrics = {k for r in runs for k in r.data.metrics}
    assert params == set(tracking.HEADLINE_PARAMS)
    # headline.json's numbers (per backend x scenario, and the accuracy cost) dominate: they are the point
    # of the table. Everything else (load times, small stage metrics, system metrics) stays under 35.
    backends, scenarios = len(default_cfg.benchmark.backends), len(default_cfg.benchmark.prompt_lengths) * len(
        default_cfg.benchmark.batch_sizes)
    head = {k for k in metrics if k.split(".")[0] in default_cfg.benchmark.backends and not k.endswith("load_s")}
    assert len(head) == backends * (3 * scenarios + 1)
    assert len(metrics - head) <= 35, sorted(metrics - head)
    # 326 columns before; 88 now for the default 4 backends x 4 scenarios (52 of them headline numbers).
    assert len(params) + len(metrics) <= 40 + backends * (3 * scenarios + 1)


def test_benchmark_run_has_system_metrics_history(store, default_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.stage_run("benchmark", default_cfg):
        deadline = time.time() + 1.2
        while time.time() < deadline:  # some CPU load to measure
            sum(i * i for i in range(10_000))
    with tracking.stage_run("weights", default_cfg):
        pass
    client, runs = _local_runs(store)
    by_stage = {r.data.tags.get("dvc.stage"): r for r in runs}
    bench = by_stage["benchmark"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= set(bench.data.metrics)
    history = client.get_metric_history(bench.info.run_id, "system/cpu_utilization_percentage")
    steps = [m.step for m in sorted(history, key=lambda m: m.step)]
    assert len(steps) >= 4 and steps == list(range(len(steps)))
    assert max(m.value for m in history) > 0
    assert all(bench.info.start_time <= m.timestamp <= bench.info.end_time for m in history)
    # GPU metrics only where a GPU can be read; none on this CPU machine.
    assert any(k.startswith("system/gpu_") for k in bench.data.metrics) == bool(tracking._gpu_monitors())
    assert not any(k.startswith("system/") for k in by_stage["weights"].data.metrics)
    assert not any(k.startswith("system/") for k in by_stage[None].data.metrics)  # the invocation run


@pytest.mark.parametrize("failing_call, note", [(1, "not sampled"), (2, "sampling stopped")])
def test_system_metrics_failure_never_fails_the_stage(store, default_cfg, monkeypatch, failing_call, note):
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    calls = []
    original = CPUMonitor.collect_metrics

    def collect(self):
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError("/proc/stat unreadable")
        original(self)

    monkeypatch.setattr(CPUMonitor, "collect_metrics", collect)
    with tracking.stage_run("benchmark", default_cfg) as stage:
        time.sleep(0.5)
        stage.log_metrics({"torch": {"load_s": 1.0}})
    _, runs = _local_runs(store)
    bench = next(r for r in runs if r.data.tags.get("dvc.stage") == "benchmark")
    assert bench.info.status == "FINISHED" and bench.data.metrics["torch.load_s"] == 1.0
    assert bench.data.tags["pipeline.system_metrics"] == f"{note}: OSError: /proc/stat unreadable"


def test_failed_stage_is_logged_failed_and_the_error_propagates(store, default_cfg):
    with pytest.raises(ValueError, match="bad things"):
        with tracking.stage_run("evaluate", default_cfg):
            raise ValueError("bad things at https://user:s3cret@host")
    _, runs = _local_runs(store)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name[f"evaluate · {LABEL}"].info.status == "FAILED"
    assert by_name[f"evaluate · {LABEL}"].data.tags["error"] == "ValueError: bad things at https://***@host"
    assert by_name[LABEL].info.status == "FAILED"


def test_credentials_never_reach_params_artifacts_or_output(store, default_cfg, monkeypatch, capsys):
    secret_uri = "https://user:s3cret@mlflow.example.com"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    params = store / "params.yaml"
    params.write_text(params.read_text().replace("uri: null", f"uri: {secret_uri}"))
    assert secret_uri in params.read_text()
    cfg = dataclasses.replace(default_cfg, tracking=dataclasses.replace(default_cfg.tracking, uri=secret_uri))
    with tracking.stage_run("weights", cfg):
        pass
    client, runs = _local_runs(store)
    for r in runs:
        assert not any("s3cret" in f"{k}={v}" for k, v in {**r.data.params, **r.data.tags}.items())
        text = Path(client.download_artifacts(r.info.run_id, "params.yaml", str(store / "dl" / r.info.run_id))).read_text()
        assert "uri: https://***@mlflow.example.com" in text and "s3cret" not in text
    # The same URI unreachable: the warning names the host, never the credentials.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{free_port()}")
    with tracking.stage_run("weights", cfg):
        pass
    err = capsys.readouterr().err
    assert "MLflow tracking failed" in err and "s3cret" not in err
    assert redact("https://user:s3cret@mlflow.example.com") == "https://***@mlflow.example.com"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_server_defers_and_backfill_logs_later(store, default_cfg, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    outputs = _outputs(default_cfg)
    _repro(default_cfg, ("benchmark", "report"), outputs)
    err = capsys.readouterr().err
    assert "MLflow tracking failed" in err and "python -m pipeline backfill" in err
    pending = tracking.pending_records()
    assert len(pending) == 2
    record = json.loads((pending[0] / "record.json").read_text())
    assert record["status"] == "FINISHED" and record["stage"] == "benchmark" and record["system_metrics"]
    # What was on disk when the stages ran is what backfill publishes, whatever is there by then.
    for name in ("benchmark", "report"):
        (store / METRICS_FILES[name]).write_text(json.dumps(_outputs(default_cfg, scale=5.0)[name]))
    # Backfill into the local store (the "server" is still down, so point the URI elsewhere).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'later.db'}")
    assert tracking.backfill(default_cfg.tracking) == (2, 0)
    assert tracking.pending_records() == []
    client, runs = _runs(f"sqlite:///{store / 'later.db'}")
    by_kind = {r.data.tags["pipeline.kind"]: r for r in runs if r.data.tags.get("dvc.stage") != "report"}
    parent, bench = by_kind["invocation"], by_kind["stage"]
    assert parent.info.run_name == LABEL and bench.info.run_name == f"benchmark · {LABEL}"
    assert bench.data.tags["pipeline.backfilled"] == "true" and bench.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params == _headline_params(default_cfg)
    expected = tracking.numeric(outputs["report"])
    assert {k: parent.data.metrics[k] for k in expected} == expected
    sampled = [(m[1], m[3]) for m in record["system_metrics"] if m[0] == "system/cpu_utilization_percentage"]
    history = client.get_metric_history(bench.info.run_id, "system/cpu_utilization_percentage")
    assert sampled and sorted((m.value, m.step) for m in history) == sorted(sampled)
    local = client.download_artifacts(bench.info.run_id, "benchmark/benchmark.json", str(store / "dl"))
    assert json.loads(Path(local).read_text()) == outputs["benchmark"]


def test_tracking_disabled_logs_nothing(store, default_cfg):
    cfg = dataclasses.replace(default_cfg, tracking=dataclasses.replace(default_cfg.tracking, enabled=False))
    with tracking.stage_run("benchmark", cfg):
        pass
    assert not (store / "mlflow.db").exists() and tracking.pending_records() == []


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
        (weights,) = [r for r in runs if r.info.run_name == f"weights · {LABEL}"]
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
        assert names == [f"weights · {LABEL}", f"weights · {LABEL}"]
        assert sum(r.data.tags.get("pipeline.backfilled") == "true" for r in runs) == 1
        assert list((project / ".tracking/pending").iterdir()) == []
    finally:
        server.stop()


@pytest.mark.slow
def test_real_server_invocation_run_and_system_metrics(tmp_path, store, default_cfg, monkeypatch):
    """Against a real `mlflow server` (REST, proxied artifacts): two invocations, the second reruns only
    benchmark and report; its run is still complete, and the benchmark run has system metrics."""
    server = MlflowServer(tmp_path, free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    server.start()
    try:
        _repro(default_cfg, PIPELINE, _outputs(default_cfg))
        monkeypatch.setattr(lineage, "invocation", lambda: ("|4343:2.000", "dvc repro"))
        _repro(default_cfg, ("benchmark", "report"), _outputs(default_cfg, scale=2.0))
        client, runs = _runs(server.uri)
        parents = [r for r in runs if r.data.tags["pipeline.kind"] == "invocation"]
        assert [p.info.run_name for p in parents] == [LABEL, LABEL]
        assert all(p.data.params == _headline_params(default_cfg) for p in parents)
        assert set(parents[0].data.metrics) == set(parents[1].data.metrics)
        assert set(tracking.numeric(_outputs(default_cfg)["report"])) <= set(parents[0].data.metrics)
        assert len({r.info.run_name for r in runs}) == len(PIPELINE) + 1
        bench = [r for r in runs if r.data.tags.get("dvc.stage") == "benchmark"]
        assert all("system/cpu_utilization_percentage" in r.data.metrics for r in bench)
        assert [a.path for a in client.list_artifacts(parents[0].info.run_id) if a.path == "params.yaml"]
    finally:
        server.stop()
