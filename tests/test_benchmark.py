"""Benchmark: metric definitions, the timing loop, the torch backend's greedy decoding, outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.backends.registry import BACKENDS, load_backend_class
from pipeline.benchmark import results, runner
from pipeline.benchmark.stats import request_metrics, summarize
from pipeline.config import BenchmarkConfig, HardwareConfig, PrecisionConfig
from pipeline.errors import PipelineError


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
    assert load_backend_class("torch").name == "torch" == next(iter(BACKENDS))
    with pytest.raises(PipelineError, match="unknown backend 'nope'"):
        load_backend_class("nope")


@pytest.fixture(scope="module")
def torch_backend(tiny_model_dir):
    backend = load_backend_class("torch")(tiny_model_dir, PrecisionConfig("fp32"), HardwareConfig("cpu"))
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
    assert metrics["torch"]["bs1_in4_out3"]["output_token_throughput"] > 0


def test_cuda_request_without_a_gpu_fails_clearly(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    backend = load_backend_class("torch")(tiny_model_dir, PrecisionConfig("fp32"), HardwareConfig("cuda"))
    with pytest.raises(PipelineError, match="hardware.device=cuda but torch sees no CUDA device"):
        backend.load()


def test_scenario_keys_are_stable():
    bench = dataclasses.replace(BenchmarkConfig(), prompt_lengths=[32], batch_sizes=[1, 4], output_length=16)
    assert [s.key for s in runner.scenarios(bench)] == ["bs1_in32_out16", "bs4_in32_out16"]
