"""Benchmark: metric definitions, the timing loop, the torch backend's greedy decoding, outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.backends.registry import BACKENDS, load_backend_class
from pipeline.benchmark import results, runner
from pipeline.benchmark.stats import request_metrics, summarize
from pipeline.config import BenchmarkConfig
from pipeline.errors import PipelineError
from tests.helpers import make_backend


def test_request_metrics_follow_the_field_definitions():
    m = request_metrics(10.0, [10.5, 10.6, 10.7, 10.9])
    assert m["ttft_ms"] == pytest.approx(500.0)
    assert m["e2el_ms"] == pytest.approx(900.0)
    assert m["tpot_ms"] == pytest.approx(400.0 / 3)
    with pytest.raises(ValueError):
        request_metrics(0.0, [1.0])


def test_summarize_percentiles():
    s = summarize("x", list(range(1, 101)))
    assert s["x_p50"] == pytest.approx(50.5) and s["x_p90"] == pytest.approx(90.1)
    assert s["x_p99"] == pytest.approx(99.01) and s["x_mean"] == 50.5 and set(s) == {"x_mean", "x_p50", "x_p90", "x_p99"}


def test_registry_resolves_names_and_rejects_unknown():
    from pipeline.backends.base import Backend

    for name in BACKENDS:
        assert issubclass(load_backend_class(name), Backend)
    with pytest.raises(PipelineError, match="unknown backend 'nope'"):
        load_backend_class("nope")


def test_registry_declares_what_each_backend_needs_and_can_do():
    from pipeline import paths

    for spec in BACKENDS.values():
        for precision in spec.precisions:
            assert spec.artifact_for(precision) in paths.ARTIFACTS, (spec.name, precision)
    assert BACKENDS["onnxruntime"].artifact_for("int8") == "onnx_int8"
    assert BACKENDS["onnxruntime"].artifact_for("fp32") == "onnx"
    assert BACKENDS["torch-tp"].distributed and not BACKENDS["torch"].distributed
    assert BACKENDS["torch"].cannot_run("int8", "cpu") == "backend torch runs precisions fp32, fp16, bf16, not int8"
    assert BACKENDS["onnxruntime"].cannot_run("bf16", "cpu") is not None
    assert BACKENDS["torch"].cannot_run("bf16", "cuda") is None


@pytest.fixture(scope="module")
def torch_backend(tiny_model_dir):
    backend = make_backend("torch", tiny_model_dir)
    backend.load()
    return backend


def test_torch_backend_greedy_tokens_match_hf_generate(torch_backend, tiny_model_dir):
    prompt = torch.randint(2, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    tokens = [torch_backend.prefill(prompt)]
    for _ in range(11):
        tokens.append(torch_backend.decode(tokens[-1]))
    ours = torch.stack(tokens, dim=1)
    expected = torch_backend.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                            min_new_tokens=12, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)[:, 17:]
    assert torch.equal(ours, expected)


def test_runner_measures_every_scenario(torch_backend):
    bench = BenchmarkConfig(backends=["torch"], prompt_lengths=[8, 16], output_length=5, batch_sizes=[1, 2],
                            warmup_runs=1, measured_runs=3, seed=0)
    out = runner.benchmark_backend(torch_backend, bench, vocab_size=512)
    keys = [k for k in out["metrics"] if k != "load_s"]
    assert keys == ["bs1_in8_out5", "bs2_in8_out5", "bs1_in16_out5", "bs2_in16_out5"]
    assert len(out["rows"]) == 12
    for key in keys:
        s = out["metrics"][key]
        assert 0 < s["ttft_ms_p50"] <= s["ttft_ms_p99"] and 0 < s["tpot_ms_p50"] <= s["tpot_ms_p99"]
        assert s["e2el_ms_p50"] >= s["ttft_ms_p50"] and s["peak_memory_mb"] > 0
    for row in out["rows"]:
        # E2E = TTFT + (N - 1) * TPOT, and tokens/s is batch * N over E2E.
        assert row["e2el_ms"] == pytest.approx(row["ttft_ms"] + 4 * row["tpot_ms"], abs=1e-3)
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 5 / (row["e2el_ms"] / 1e3), rel=1e-3)
    assert out["conditions"]["ignore_eos"] is True and out["conditions"]["memory_method"] == "process_peak_rss"


def test_results_files_round_trip(tmp_path, torch_backend):
    bench = BenchmarkConfig(prompt_lengths=[4], output_length=3, batch_sizes=[1], warmup_runs=0, measured_runs=2)
    raw = {"torch": runner.benchmark_backend(torch_backend, bench, vocab_size=512)}
    metrics = results.write_results(raw, tmp_path / "m.json", tmp_path / "c.json", tmp_path / "runs.csv")
    rows = results.read_runs(tmp_path / "runs.csv")
    assert len(rows) == 2 and rows[0]["backend"] == "torch" and rows[0]["tpot_ms"] > 0
    assert rows[0]["tp"] == rows[0]["pp"] == 1  # tp and pp are columns of every row
    assert metrics["torch"]["bs1_in4_out3"]["output_token_throughput"] > 0


def test_cuda_request_without_a_gpu_fails_clearly(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    backend = make_backend("torch", tiny_model_dir, device="cuda")
    with pytest.raises(PipelineError, match="hardware.device=cuda but torch sees no CUDA device"):
        backend.load()


def test_scenario_keys_are_stable():
    bench = dataclasses.replace(BenchmarkConfig(), prompt_lengths=[32], batch_sizes=[1, 4], output_length=16)
    assert [s.key for s in runner.scenarios(bench)] == ["bs1_in32_out16", "bs4_in32_out16"]


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A project dir holding the weights; the launcher resolves artifacts relative to it, as stages do."""
    import shutil

    from pipeline import artifacts

    shutil.copytree(tiny_model_dir, tmp_path / "artifacts" / "weights")
    for name in ("onnx", "onnx_int8"):
        with artifacts.atomic_dir(tmp_path / "artifacts" / name) as d:
            (d / "model.onnx").write_bytes(name.encode())
            artifacts.write_manifest(d, kind=name)
    with artifacts.atomic_dir(tmp_path / "artifacts" / "trtllm") as d:
        artifacts.write_manifest(d, kind="trtllm-checkpoint", tp=1, pp=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg(default_raw, **sections):
    import copy

    from pipeline import config

    raw = copy.deepcopy(default_raw)
    for key, value in sections.items():
        raw[key].update(value)
    return config.from_dict(raw)


def test_launcher_hands_each_backend_the_artifact_it_declares(project, default_raw):
    from pipeline.benchmark import launcher

    plan = launcher.plan(_cfg(default_raw, precision={"name": "int8"}), vocab_size=512)
    assert set(plan.jobs) == {"onnxruntime"} and set(plan.skipped) == {"torch", "torch-tp"}
    assert plan.jobs["onnxruntime"]["inputs"]["artifact"] == "artifacts/onnx_int8"
    plan = launcher.plan(_cfg(default_raw), vocab_size=512)
    assert {n: j["inputs"]["artifact"] for n, j in plan.jobs.items()} == {
        "torch": "artifacts/weights", "onnxruntime": "artifacts/onnx", "torch-tp": "artifacts/trtllm"}
    assert plan.jobs["torch-tp"]["distributed"] and plan.parallel == {"tp": 1, "pp": 1, "benchmarked_by": ["torch-tp"]}


def test_launcher_verifies_artifacts_and_checks_the_layout(project, default_raw):
    from pipeline.benchmark import launcher

    (project / "artifacts/onnx/model.onnx").write_bytes(b"ONNX")  # same size, other bytes
    with pytest.raises(PipelineError, match="artifacts/onnx/model.onnx: sha256 differs"):
        launcher.plan(_cfg(default_raw), vocab_size=512)
    with pytest.raises(PipelineError, match=r"artifacts/trtllm: converted for tp=1 pp=1, params.yaml asks tp=2 pp=1"):
        launcher.plan(_cfg(default_raw, parallel={"tp": 2}, benchmark={"backends": ["torch-tp"]}), vocab_size=512)


def test_a_parallel_layout_without_a_distributed_backend_is_recorded(project, default_raw):
    from pipeline.benchmark import launcher

    plan = launcher.plan(_cfg(default_raw, parallel={"tp": 2}, benchmark={"backends": ["torch"]}), vocab_size=512)
    assert plan.parallel["not_benchmarked"].startswith("parallel.tp=2 x parallel.pp=1 was not benchmarked")
