"""Stage `report` library: markdown + PNG plots from metrics files; clear errors when inputs are missing."""

from __future__ import annotations

import pytest

from pipeline import report
from pipeline.benchmark import results, runner
from pipeline.backends.registry import load_backend_class
from pipeline.config import BenchmarkConfig, HardwareConfig, PrecisionConfig
from pipeline.artifacts import atomic_write_json
from pipeline.errors import PipelineError


def test_report_from_real_benchmark_results(tmp_path, tiny_model_dir):
    backend = load_backend_class("torch")(tiny_model_dir, PrecisionConfig("fp32"), HardwareConfig("cpu"))
    bench = BenchmarkConfig(prompt_lengths=[4, 8], output_length=3, batch_sizes=[1, 2], warmup_runs=0, measured_runs=2)
    raw = {"torch": runner.benchmark_backend(backend, bench, vocab_size=512)}
    results.write_results(raw, tmp_path / "b.json", tmp_path / "c.json", tmp_path / "runs.csv")
    atomic_write_json(tmp_path / "w.json", {"parameter_count": 254528, "bytes": 1000, "seconds": 0.1})
    inputs = report.ReportInputs(tmp_path / "b.json", tmp_path / "c.json", tmp_path / "runs.csv", tmp_path / "w.json",
                                 tiny_model_dir)
    built = report.build(inputs, tmp_path / "reports")
    assert built["files"] == ["report.md", "latency.png", "throughput.png", "tpot_distribution.png"]
    md = (tmp_path / "reports/report.md").read_text()
    assert "| bs2_in8_out3 |" in md and "254,528 parameters" in md and "![latency.png](latency.png)" in md
    for png in built["files"][1:]:
        assert (tmp_path / "reports" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_names_the_missing_input(tmp_path, tiny_model_dir):
    with pytest.raises(PipelineError, match=r"b.json: missing; run the stage that writes it"):
        report.build(report.ReportInputs(tmp_path / "b.json", tmp_path / "c.json", tmp_path / "runs.csv",
                                         tmp_path / "w.json", tiny_model_dir), tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
