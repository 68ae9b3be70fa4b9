"""Stage `report` library, built from a real benchmark and evaluation of the tiny model: report.md + PNGs,
metrics/headline.json, the `dvc plots` data; and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest
from PIL import Image

from pipeline import report
from pipeline.artifacts import atomic_write_json
from pipeline.backends.base import BackendInputs
from pipeline.backends.registry import load_backend_class
from pipeline.benchmark import results, runner
from pipeline.config import BenchmarkConfig
from pipeline.model.args import LlamaArgs
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.report.headline import HEADLINE_METRICS
from pipeline.report.tables import PLOT_DATA_FIELDS

# bf16, so the accuracy delta the headline picks up (torch_bf16) is not the reference's trivial 0.
PRECISION = "bf16"
BENCH = BenchmarkConfig(prompt_lengths=[4, 8], output_length=3, batch_sizes=[1, 2], warmup_runs=0, measured_runs=2)
SCENARIOS = {"bs1_in4_out3", "bs2_in4_out3", "bs1_in8_out3", "bs2_in8_out3"}


def _count_numbers(data) -> int:
    if isinstance(data, dict):
        return sum(_count_numbers(v) for v in data.values())
    return int(isinstance(data, (int, float)) and not isinstance(data, bool))


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory, tiny_model_dir):
    """benchmark.json, conditions, runs CSV, evaluate.json and weights.json as the stages write them."""
    d = tmp_path_factory.mktemp("metrics")
    backend = load_backend_class("torch")(BackendInputs("torch", tiny_model_dir, PRECISION, "cpu"))
    args = LlamaArgs.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), "config.json")
    hardware = {"measure": False, "name": "test CPU", "memory_bandwidth_gbs": 20.0, "peak_tflops": {"bf16": 1.0}}
    raw = {"torch": runner.benchmark_backend(backend, BENCH, vocab_size=512,
                                             roof=runner.RooflineInputs(args, hardware, lm_head_quantized=False))}
    results.write_results(raw, d / "b.json", d / "c.json", d / "runs.csv")
    scored = evaluate(tiny_model_dir, torch_precisions=("fp32", PRECISION), max_sequences=2)
    atomic_write_json(d / "e.json", {**scored["metrics"], "reference_ppl": scored["reference_ppl"],
                                      "scored_positions": scored["scored_positions"]})
    atomic_write_json(d / "w.json", {"parameter_count": 254528, "bytes": 1000, "seconds": 0.1})
    return d


def _inputs(d, model_dir, **overrides) -> report.ReportInputs:
    kwargs = dict(benchmark=d / "b.json", conditions=d / "c.json", runs=d / "runs.csv", weights_metrics=d / "w.json",
                  weights_dir=model_dir, evaluate=d / "e.json")
    return report.ReportInputs(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def built(tmp_path_factory, metrics_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("out")
    result = report.build(_inputs(metrics_dir, tiny_model_dir), out / "reports", headline_path=out / "headline.json",
                          plot_data_path=out / "plots.json")
    return out, result


def test_report_from_real_benchmark_results(built):
    out, result = built
    assert result["files"] == ["report.md", "latency.png", "throughput.png", "tpot_distribution.png", "roofline.png",
                               "accuracy.png"]
    assert sorted(p.name for p in (out / "reports").iterdir()) == sorted(result["files"])
    md = (out / "reports/report.md").read_text()
    assert "| bs2_in8_out3 |" in md and "254,528 parameters" in md and "![latency.png](latency.png)" in md
    assert "| decode bound (ms) | % of roofline | prefill MFU % |" in md and "![roofline.png](roofline.png)" in md
    assert "Roofline figures: bf16 weights, 20 GB/s and 1 TFLOP/s bf16 (published, test CPU)." in md
    assert "| torch_bf16 |" in md and "(`torch_bf16`)" in md
    for png in result["files"][1:]:
        with Image.open(out / "reports" / png) as img:
            img.verify()  # raises on a truncated or corrupt file
        with Image.open(out / "reports" / png) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200


def test_headline_holds_the_p50s_and_the_accuracy_of_the_artifact_the_backend_ran(built, metrics_dir):
    out, result = built
    head = json.loads((out / "headline.json").read_text())
    assert head == result["headline"]
    bench = json.loads((metrics_dir / "b.json").read_text())
    scored = json.loads((metrics_dir / "e.json").read_text())
    assert set(head) == {"torch"}
    assert set(head["torch"]) == SCENARIOS | {"ppl_delta_pct"}
    assert head["torch"]["ppl_delta_pct"] == pytest.approx(scored[f"torch_{PRECISION}"]["ppl_delta_pct"], rel=1e-3)
    assert head["torch"]["ppl_delta_pct"] != 0  # bf16, not the fp32 reference
    for key in SCENARIOS:
        assert head["torch"][key] == {m: bench["torch"][key][m] for m in HEADLINE_METRICS if m != "ppl_delta_pct"}
    assert _count_numbers(head) == len(SCENARIOS) * 3 + 1


def test_plot_data_is_one_series_per_backend_ordered_by_scenario_shape(built):
    out, _ = built
    records = json.loads((out / "plots.json").read_text())
    assert all(set(r) == set(PLOT_DATA_FIELDS) for r in records)
    series = defaultdict(list)
    for r in records:
        series[r["backend"]].append(r)
    assert list(series) == ["torch"]
    # One point per scenario (a line needs one y per x), small prompts first, then by batch size.
    assert [r["scenario"] for r in series["torch"]] == ["bs1_in4_out3", "bs2_in4_out3", "bs1_in8_out3", "bs2_in8_out3"]
    assert all(r["tp"] == 1 and r["pp"] == 1 and r["tpot_ms_p50"] > 0 for r in records)


def test_report_sections_for_the_onnx_and_parallel_inputs(tmp_path, metrics_dir, tiny_model_dir):
    graph = {"ops_before": {"MatMul": 37, "Mul": 51}, "ops_after_ort": {"MatMul": 33, "FusedMatMul": 4, "Mul": 39},
             "ort_optimization": "all"}
    export = {"prefill_max_abs_diff": 1e-6, "prefill_top1_agreement": 1.0, "decode_max_abs_diff": 1e-6,
              "decode_top1_agreement": 1.0, "nodes_before": 88, "nodes_after_ort": 76, "stage_s": 9.0}
    verify = {"ft": {"logits_max_abs_diff": 1e-6, "top1_agreement": 1.0, "generation_token_exact": 1, "gate_pass": 1},
              "layout": {"tp": 2, "pp": 1}}
    for name, data in (("g.json", graph), ("x.json", export), ("v.json", verify), ("k.json", {"calibration_feeds": 32})):
        atomic_write_json(tmp_path / name, data)
    result = report.build(_inputs(metrics_dir, tiny_model_dir, graph=tmp_path / "g.json", export=tmp_path / "x.json",
                                  verify=tmp_path / "v.json", calibrate=tmp_path / "k.json"), tmp_path / "reports")
    assert result["files"][-1] == "onnx_ops.png"
    md = (tmp_path / "reports/report.md").read_text()
    assert "| FusedMatMul | 0 | 4 |" in md and "(tp=2, pp=1)" in md and "| ft |" in md
    with Image.open(tmp_path / "reports/onnx_ops.png") as img:
        img.verify()


@pytest.mark.parametrize("missing", ["benchmark", "conditions", "runs", "weights_metrics", "evaluate", "manifest"])
def test_a_missing_input_is_named_in_one_line_and_nothing_is_written(tmp_path, metrics_dir, tiny_model_dir, missing):
    model_dir = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, model_dir)
    d = tmp_path / "metrics"
    shutil.copytree(metrics_dir, d)
    inputs = _inputs(d, model_dir)
    gone = model_dir / "manifest.json" if missing == "manifest" else getattr(inputs, missing)
    gone.unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "reports").mkdir()
    (out / "reports/report.md").write_text("previous report\n")
    with pytest.raises(PipelineError) as e:
        report.build(inputs, out / "reports", headline_path=out / "headline.json", plot_data_path=out / "plots.json")
    message = str(e.value)
    assert message.startswith(f"{gone}: missing") and "dvc repro" in message and "\n" not in message
    # The previous report is untouched and nothing new (not even a .partial/ or .tmp) was left.
    assert sorted(p.name for p in out.rglob("*")) == ["report.md", "reports"]
    assert (out / "reports/report.md").read_text() == "previous report\n"


def _copy_without(tmp_path, metrics_dir, name: str, *keys: str):
    """A copy of the metrics folder whose JSON file `name` lacks the entry at the path `keys`."""
    d = tmp_path / "metrics"
    shutil.copytree(metrics_dir, d)
    data = json.loads((d / name).read_text())
    parent = data
    for key in keys[:-1]:
        parent = parent[key]
    del parent[keys[-1]]
    atomic_write_json(d / name, data)
    return d


def test_an_incomplete_input_is_named_in_one_line(tmp_path, metrics_dir, tiny_model_dir):
    d = _copy_without(tmp_path, metrics_dir, "b.json", "torch", "bs2_in8_out3", "tpot_ms_p50")
    with pytest.raises(PipelineError, match=r"^\S+b\.json: torch\.bs2_in8_out3 lacks tpot_ms_p50; rerun"):
        report.build(_inputs(d, tiny_model_dir), tmp_path / "reports")
    (d / "e.json").write_text("{not json")
    with pytest.raises(PipelineError, match=r"^\S+e\.json: not valid JSON"):
        report.build(_inputs(d, tiny_model_dir), tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_benchmark_and_runs_must_agree(tmp_path, metrics_dir, tiny_model_dir):
    d = tmp_path / "metrics"
    shutil.copytree(metrics_dir, d)
    lines = (d / "runs.csv").read_text().splitlines()
    (d / "runs.csv").write_text("\n".join(line for line in lines if "bs2_in8_out3" not in line) + "\n")
    with pytest.raises(PipelineError, match=r"runs\.csv: no runs for torch/bs2_in8_out3 of \S+b\.json"):
        report.build(_inputs(d, tiny_model_dir), tmp_path / "reports")


def test_backend_table_has_the_roofline_columns_of_each_scenario(built, metrics_dir):
    out, _ = built
    bench = json.loads((metrics_dir / "b.json").read_text())["torch"]["bs2_in8_out3"]
    line = next(line for line in (out / "reports/report.md").read_text().splitlines()
                if line.startswith("| bs2_in8_out3 |"))
    bound, pct, mfu = (float(c) for c in line.strip("|").split("|")[-3:])
    assert bound == pytest.approx(bench["decode_bound_ms"], rel=1e-2) and bound > 0
    assert pct == pytest.approx(bench["roofline_pct"], rel=1e-2) and mfu == pytest.approx(bench["mfu_pct"], rel=1e-2)


def test_roofline_panels_pair_each_tpot_with_its_bound(metrics_dir):
    from pipeline.report import tables

    bench = json.loads((metrics_dir / "b.json").read_text())
    table = tables.scenario_table(bench, results.read_runs(metrics_dir / "runs.csv"))
    panel = tables.roofline_panels(table)["torch"]
    assert panel["scenario"] == ["bs1_in4_out3", "bs2_in4_out3", "bs1_in8_out3", "bs2_in8_out3"]
    for i, key in enumerate(panel["scenario"]):
        assert panel["tpot_ms_p50"][i] == bench["torch"][key]["tpot_ms_p50"]
        assert panel["decode_bound_ms"][i] == bench["torch"][key]["decode_bound_ms"]
    # Batch 2 reads the same weights as batch 1 plus a second KV cache: a bound at least as long.
    assert panel["decode_bound_ms"][1] >= panel["decode_bound_ms"][0]


def test_conditions_without_roofline_figures_are_named(tmp_path, metrics_dir, tiny_model_dir):
    d = _copy_without(tmp_path, metrics_dir, "c.json", "torch", "roofline", "peak_dtype")
    with pytest.raises(PipelineError, match=r"^\S+c\.json: torch\.roofline lacks peak_dtype; rerun"):
        report.build(_inputs(d, tiny_model_dir), tmp_path / "reports")


# --- serving (stage serve's metrics/serving.json) ------------------------------------------------------------------

SERVING_SLO = {"ttft_ms": 100.0, "tpot_ms": 20.0}


def _serving_point(backend, point, rate, goodput, ttft_p99, tpot_p99, tok_s, req_s, **extra) -> dict:
    return {"backend": backend, "precision": "bf16", "tp": 1, "pp": 1, "point": point, "load": "rate",
            "request_rate": rate, "concurrency": None, "output_token_throughput": tok_s, "request_throughput": req_s,
            "goodput": goodput, "ttft_ms_p99": ttft_p99, "tpot_ms_p99": tpot_p99, "e2el_ms_p99": ttft_p99 + 2 * tpot_p99,
            "completed": 3, **extra}


def _serving(tmp_path, name="serving.json", **changes):
    """A serving.json of 2 backends x 2 rates; beta at max load is the best point meeting SERVING_SLO (alpha at
    2 req/s meets it with more tokens/s but less goodput; alpha at max load has the most tokens but misses it)."""
    points = [
        _serving_point("alpha", "rate_2", 2.0, 1.5, 50.0, 10.0, 1800.0, 1.5, ttft_ms_p50=45.0, tpot_ms_p50=9.0,
                       itl_ms_p99=11.0, throughput_roofline_pct=12.5, goodput_fraction=1.0, mean_concurrency=0.2,
                       kv_slot_utilization=0.125),
        _serving_point("alpha", "rate_inf", float("inf"), 0.0, 179.4, 30.0, 2000.0, 3.0),
        _serving_point("beta", "rate_2", 2.0, 0.5, 246.8, 39.5, 600.0, 1.5),
        _serving_point("beta", "rate_inf", float("inf"), 2.5, 80.0, 18.0, 1500.0, 2.5),
    ]
    summary = {"settings": {"num_requests": 3, "dataset": "random", "input_len": 16, "output_len": 3,
                            "range_ratio": 0.0, "max_num_seqs": 8, "slo": SERVING_SLO}, "points": points}
    for key, value in changes.items():
        if value is None:
            del summary[key]
        else:
            summary[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(summary))  # request_rate inf is written as Infinity, as the serve stage does
    return path


def test_report_with_serving_results_has_the_serving_section_and_chart(tmp_path, metrics_dir, tiny_model_dir):
    result = report.build(_inputs(metrics_dir, tiny_model_dir, serving=_serving(tmp_path)), tmp_path / "reports")
    assert result["files"][-1] == "serving.png" and result["files"].count("serving.png") == 1
    png = (tmp_path / "reports/serving.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "reports/serving.png") as img:
        img.verify()
    md = (tmp_path / "reports/report.md").read_text()
    assert md.count("## Serving") == 1 and "![serving.png](serving.png)" in md
    assert "3 requests per load point (random: input 16, output 3 tokens, range ratio 0.0), 8 sequences" in md
    assert "requests meeting ttft_ms <= 100, tpot_ms <= 20 per second" in md
    assert ("| alpha | bf16 | 2 req/s | 1800.0 | 12.50 | 1.50 | 1.50 (100 %) | 45.0 / 50.0 | 9.00 / 10.00 | 11.00 "
            "| 70.0 | 0.2 | 12.50 % |") in md
    rows = [line for line in md.splitlines() if line.startswith(("| alpha |", "| beta |"))]
    assert [line.split(" | ")[:3] for line in rows] == [["| alpha", "bf16", "2 req/s"], ["| alpha", "bf16", "max load"],
                                                         ["| beta", "bf16", "2 req/s"], ["| beta", "bf16", "max load"]]
    assert "Best configuration per SLO" in md
    assert ("| TTFT p99 <= 100 ms and TPOT p99 <= 20 ms | beta bf16 tp1xpp1 | max load | 2.50 | 1500.0 | 80.0 "
            "| 18.00 |") in md
    assert "| no SLO | alpha bf16 tp1xpp1 | max load | 0.00 | 2000.0 | 179.4 | 30.00 |" in md


def test_report_names_an_slo_no_serving_point_meets(tmp_path, metrics_dir, tiny_model_dir):
    strict = _serving(tmp_path, settings={"slo": {"ttft_ms": 10.0}})
    report.build(_inputs(metrics_dir, tiny_model_dir, serving=strict), tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    assert "| TTFT p99 <= 10 ms | no measured point meets it | | | | | |" in md


def test_report_without_serving_has_no_serving_section(built):
    out, result = built
    md = (out / "reports/report.md").read_text()
    assert "serving.png" not in result["files"] and not (out / "reports/serving.png").exists()
    assert "## Serving" not in md and "Best configuration per SLO" not in md


def test_serving_without_points_draws_nothing(tmp_path, metrics_dir, tiny_model_dir):
    """The serve stage writes "points": [] when no backend could run: no section, no chart, no error."""
    result = report.build(_inputs(metrics_dir, tiny_model_dir, serving=_serving(tmp_path, points=[])),
                          tmp_path / "reports")
    assert "serving.png" not in result["files"]
    assert "## Serving" not in (tmp_path / "reports/report.md").read_text()


@pytest.mark.parametrize("broken", ["no points", "no settings", "point without goodput", "point without backend"])
def test_an_incomplete_serving_file_is_named_in_one_line_and_nothing_is_written(tmp_path, metrics_dir, tiny_model_dir,
                                                                              broken):
    if broken == "no points":
        path = _serving(tmp_path, points=None)
    elif broken == "no settings":
        path = _serving(tmp_path, settings=None)
    else:
        field = broken.rsplit(" ", 1)[-1]
        path = _serving(tmp_path)
        summary = json.loads(path.read_text())
        del summary["points"][1][field]
        path.write_text(json.dumps(summary))
    out = tmp_path / "out"
    (out / "reports").mkdir(parents=True)
    (out / "reports/report.md").write_text("previous report\n")
    with pytest.raises(PipelineError) as e:
        report.build(_inputs(metrics_dir, tiny_model_dir, serving=path), out / "reports",
                     headline_path=out / "headline.json", plot_data_path=out / "plots.json")
    message = str(e.value)
    expected = (f"{path}: no \"points\" list or \"settings\"; rerun" if broken.startswith("no ")
                else f"{path}: points[1] lacks {broken.rsplit(' ', 1)[-1]}; rerun")
    assert message.startswith(expected) and "dvc repro" in message and "\n" not in message
    # The previous report is untouched and nothing new (not even a .partial/ or .tmp) was left.
    assert sorted(p.name for p in out.rglob("*")) == ["report.md", "reports"]
    assert (out / "reports/report.md").read_text() == "previous report\n"
