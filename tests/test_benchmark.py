"""Benchmark: metric definitions, the timing loop, the torch backend's greedy decoding, outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.backends.registry import BACKENDS, load_backend_class
from pipeline.benchmark import results, roofline, runner
from pipeline.benchmark.stats import request_metrics, summarize
from pipeline.config import BenchmarkConfig
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from tests.helpers import make_backend

# Published figures (no measurement) for the tests that are not about measuring.
PUBLISHED = {"measure": False, "name": "test figures", "memory_bandwidth_gbs": 20.0, "peak_tflops": {"fp32": 0.5}}


def _roof(model_dir, hardware=PUBLISHED) -> runner.RooflineInputs:
    args = LlamaArgs.from_hf_config(json.loads((model_dir / "config.json").read_text()), "config.json")
    return runner.RooflineInputs(args, hardware, lm_head_quantized=False)


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


def test_runner_measures_every_scenario(torch_backend, tiny_model_dir):
    bench = BenchmarkConfig(backends=["torch"], prompt_lengths=[8, 16], output_length=5, batch_sizes=[1, 2],
                            warmup_runs=1, measured_runs=3, seed=0)
    roof = _roof(tiny_model_dir)
    out = runner.benchmark_backend(torch_backend, bench, vocab_size=512, roof=roof)
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
        # Every row carries its scenario's roofline and its own TPOT/TTFT as % of it.
        assert list(row)[-len(results.ROOFLINE_COLUMNS):] == results.ROOFLINE_COLUMNS
        cost = roofline.scenario(roof.model, "fp32", row["batch_size"], row["prompt_length"], 5,
                                 roofline.Hardware(20.0, 0.5))
        assert row["decode_bytes_per_step"] == cost.decode_bytes_per_step and row["prefill_flops"] == cost.prefill_flops
        assert row["roofline_pct"] == pytest.approx(100 * cost.decode_bound_ms / row["tpot_ms"], rel=1e-3)
        assert row["mfu_pct"] == pytest.approx(100 * cost.prefill_flops / (row["ttft_ms"] * 0.5e9), rel=1e-3)
    for key in keys:  # summaries: the medians' percentages
        s = out["metrics"][key]
        assert s["roofline_pct"] == pytest.approx(100 * s["decode_bound_ms"] / s["tpot_ms_p50"], rel=1e-3)
        assert set(results.ROOFLINE_COLUMNS) <= set(s)
    bytes_per_step = {key: out["metrics"][key]["decode_bytes_per_step"] for key in keys}
    assert bytes_per_step["bs2_in16_out5"] > bytes_per_step["bs1_in16_out5"] > bytes_per_step["bs1_in8_out5"]
    assert out["conditions"]["ignore_eos"] is True and out["conditions"]["memory_method"] == "process_peak_rss"
    assert out["conditions"]["roofline"] == {
        "name": "test figures", "peak_dtype": "fp32", "source": "published", "memory_bandwidth_gbs": 20.0,
        "peak_tflops": 0.5, "devices": 1, "lm_head_quantized": False,
        "bytes_per_element": {"weight": 4, "channel": 0, "float": 4}}


def test_results_files_round_trip(tmp_path, torch_backend, tiny_model_dir):
    bench = BenchmarkConfig(prompt_lengths=[4], output_length=3, batch_sizes=[1], warmup_runs=0, measured_runs=2)
    raw = {"torch": runner.benchmark_backend(torch_backend, bench, vocab_size=512, roof=_roof(tiny_model_dir))}
    metrics = results.write_results(raw, tmp_path / "m.json", tmp_path / "c.json", tmp_path / "runs.csv")
    rows = results.read_runs(tmp_path / "runs.csv")
    assert len(rows) == 2 and rows[0]["backend"] == "torch" and rows[0]["tpot_ms"] > 0
    assert rows[0]["tp"] == rows[0]["pp"] == 1  # tp and pp are columns of every row
    assert list(rows[0]) == results.RUN_COLUMNS and rows[0]["roofline_pct"] > 0 and rows[0]["peak_tflops"] == 0.5
    assert json.loads((tmp_path / "c.json").read_text())["torch"]["roofline"]["source"] == "published"
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
            # The calibrate stage records what it quantized (the roofline reads whether lm_head is 8-bit).
            settings = {"op_types": ["MatMul"], "nodes_to_exclude": []} if name == "onnx_int8" else {}
            artifacts.write_manifest(d, kind=name, **({"settings": settings} if settings else {}))
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
    assert set(plan.jobs) == {"onnxruntime"} and set(plan.skipped) == {"torch", "torch-compiled", "torch-tp"}
    assert plan.jobs["onnxruntime"]["inputs"]["artifact"] == "artifacts/onnx_int8"
    plan = launcher.plan(_cfg(default_raw), vocab_size=512)
    assert {n: j["inputs"]["artifact"] for n, j in plan.jobs.items()} == {
        "torch": "artifacts/weights", "torch-compiled": "artifacts/weights", "onnxruntime": "artifacts/onnx",
        "torch-tp": "artifacts/trtllm"}
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


def test_launcher_gives_each_job_the_model_shape_hardware_and_lm_head_storage(project, default_raw):
    from pipeline import artifacts
    from pipeline.benchmark import launcher

    plan = launcher.plan(_cfg(default_raw), vocab_size=512)
    shape = LlamaArgs.from_hf_config(json.loads((project / "artifacts/weights/config.json").read_text()), "x")
    for job in plan.jobs.values():
        assert LlamaArgs(**job["model"]) == shape and shape.hidden_size == 64
        assert job["hardware"] == {"device": "cpu", "num_threads": 0, "name": None, "measure": True,
                                   "memory_bandwidth_gbs": None, "peak_tflops": {}, "price_per_hour": None}
        assert job["lm_head_quantized"] is False  # fp32
    assert launcher.plan(_cfg(default_raw, precision={"name": "int8"}), vocab_size=512).jobs[
        "onnxruntime"]["lm_head_quantized"] is True
    manifest = artifacts.read_manifest(project / "artifacts/onnx_int8")
    manifest["settings"]["nodes_to_exclude"] = ["lm_head"]
    (project / "artifacts/onnx_int8/manifest.json").write_text(json.dumps(manifest))
    assert launcher.lm_head_quantized("int8", project / "artifacts/onnx_int8") is False
    del manifest["settings"]
    (project / "artifacts/onnx_int8/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=r"onnx_int8/manifest.json: no settings.op_types"):
        launcher.lm_head_quantized("int8", project / "artifacts/onnx_int8")


def test_launcher_rejects_missing_published_figures_before_running(project, default_raw):
    from pipeline.benchmark import launcher

    hw = {"measure": False, "memory_bandwidth_gbs": 20.0, "peak_tflops": {"bf16": 1.0}}
    with pytest.raises(PipelineError, match=r"^hardware.peak_tflops.fp32 is not set and hardware.measure=false"):
        launcher.plan(_cfg(default_raw, hardware=hw), vocab_size=512)
    (project / "artifacts/weights/config.json").unlink()
    with pytest.raises(PipelineError, match=r"artifacts/weights/config.json: missing; rerun the weights stage"):
        launcher.plan(_cfg(default_raw), vocab_size=512)


def test_worker_runs_the_job_and_measures_the_hardware(project, default_raw, tmp_path):
    """The job as the launcher writes it, through the worker's own entry point (in-process): hardware.measure
    is on by default (conf/hardware/cpu.yaml), so the figures are measured on this CPU before the scenarios."""
    from pipeline.benchmark import launcher, worker

    job = launcher.plan(_cfg(default_raw, benchmark={"backends": ["torch"]}), vocab_size=512).jobs["torch"]
    job["benchmark"].update(prompt_lengths=[4], batch_sizes=[1], output_length=3, warmup_runs=0, measured_runs=2)
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert worker.main([str(tmp_path / "job.json"), str(tmp_path / "result.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    measured = result["conditions"]["roofline"]
    assert measured["source"] == "measured" and measured["peak_dtype"] == "fp32" and "published" not in measured
    assert measured["memory_bandwidth_gbs"] > 0 and measured["peak_tflops"] > 0 and measured["seconds"] > 0
    summary = result["metrics"]["bs1_in4_out3"]
    assert summary["memory_bandwidth_gbs"] == measured["memory_bandwidth_gbs"]
    assert 0 < summary["roofline_pct"] and 0 < summary["mfu_pct"]
    assert all(set(results.ROOFLINE_COLUMNS) <= set(row) for row in result["rows"])


def test_torch_backend_passes_the_kv_cache_under_the_name_the_model_declares(torch_backend, monkeypatch):
    """An older transformers (the GPU image's 5.17) takes `past_key_values` and swallows `cache=` in **kwargs,
    which would decode with no cache at all: the backend must feed the cache under the declared name."""
    prompt = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    reference = [torch_backend.prefill(prompt)]
    reference.append(torch_backend.decode(reference[-1]))
    forward = torch_backend.model.forward
    seen = []

    def old_forward(input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        assert "cache" not in kwargs
        seen.append(past_key_values)
        return forward(input_ids=input_ids, cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)

    monkeypatch.setattr(torch_backend, "cache_kwarg", "past_key_values")
    monkeypatch.setattr(torch_backend.model, "forward", old_forward)
    tokens = [torch_backend.prefill(prompt)]
    tokens.append(torch_backend.decode(tokens[-1]))
    assert len(seen) == 2 and all(c is not None for c in seen)
    assert torch.equal(torch.stack(tokens), torch.stack(reference))
