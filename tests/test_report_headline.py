"""pipeline.report's pure parts: the headline (which evaluated artifact each backend ran, its size for the
default config), the tables behind the plots, and the dvc.yaml entries that read the report's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.benchmark.runner import scenarios
from pipeline.report import tables
from pipeline.paths import HEADLINE_METRICS as HEADLINE_PATH, REPORT_PLOT_DATA
from pipeline.report.headline import HEADLINE_METRICS, evaluated_artifact, headline
from tests.conftest import ROOT

SUMMARY = {"ttft_ms_p50": 2.0, "tpot_ms_p50": 1.0, "output_token_throughput": 100.0, "tpot_ms_p99": 9.0}
EVALUATION = {name: {"ppl_delta_pct": delta, "ppl": 90.0} for name, delta in
              (("torch_fp32", 0.0), ("torch_fp16", 0.01), ("torch_bf16", 0.06), ("onnx_fp32", -1e-6),
               ("onnx_int8", 0.0884830330136399))} | {"reference_ppl": 92.4, "scored_positions": 441}


@pytest.mark.parametrize("backend, precision, artifact", [
    ("torch", "fp32", "torch_fp32"), ("torch", "bf16", "torch_bf16"), ("torch-tp", "fp16", "torch_fp16"),
    ("onnxruntime", "fp32", "onnx_fp32"), ("onnxruntime", "int8", "onnx_int8"), ("onnxruntime", "bf16", None),
    ("tensorrt", "fp16", None), ("torch", None, None)])
def test_each_backend_maps_to_the_artifact_it_ran(backend, precision, artifact):
    assert evaluated_artifact(backend, precision) == artifact


def test_headline_takes_the_matching_accuracy_and_leaves_out_what_has_none():
    bench = {b: {"load_s": 1.5, "bs1_in32_out32": SUMMARY} for b in ("torch", "onnxruntime", "torch-tp")}
    conditions = {"torch": {"precision": "bf16"}, "onnxruntime": {"precision": "int8"}, "torch-tp": {"precision": "int8"},
                  "parallel": {"tp": 2, "pp": 1, "benchmarked_by": ["torch-tp"]}}
    head = headline(bench, conditions, EVALUATION)
    assert head == {
        "torch": {"ppl_delta_pct": 0.06, "bs1_in32_out32": {"ttft_ms_p50": 2.0, "tpot_ms_p50": 1.0,
                                                           "output_token_throughput": 100.0}},
        "onnxruntime": {"ppl_delta_pct": 0.08848, "bs1_in32_out32": head["torch"]["bs1_in32_out32"]},
        # torch-tp at int8 has no evaluated artifact (no torch_int8): the key is left out, not faked.
        "torch-tp": {"bs1_in32_out32": head["torch"]["bs1_in32_out32"]},
    }
    assert headline(bench, conditions, None)["torch"] == {"bs1_in32_out32": head["torch"]["bs1_in32_out32"]}


def test_default_config_headline_stays_small(default_cfg):
    """`dvc exp show` shows headline.json by default: one column per number, so it must stay short."""
    bench = default_cfg.benchmark
    keys = [s.key for s in scenarios(bench)]
    metrics = {b: {"load_s": 1.0, **{k: SUMMARY for k in keys}} for b in bench.backends}
    conditions = {b: {"precision": default_cfg.precision.name} for b in bench.backends}
    head = headline(metrics, conditions, EVALUATION)
    leaves = {(b, k, m) for b, entry in head.items() for k, v in entry.items()
              for m in (v if isinstance(v, dict) else [k])}
    assert len(leaves) == len(bench.backends) * (3 * len(keys) + 1)
    assert len(leaves) <= 60  # 4 backends x 4 scenarios x 3 + 4 accuracy deltas = 52 (302 columns before)
    assert {m for _, _, m in leaves} == set(HEADLINE_METRICS)


def test_headline_module_loads_without_matplotlib():
    code = ("import sys; from pipeline.report.headline import HEADLINE_METRICS; "
            "bad = [m for m in ('matplotlib', 'torch', 'mlflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_scenario_table_orders_by_shape_and_defaults_tp_pp_to_1():
    bench = {"onnxruntime": {"load_s": 0.1, "bs4_in128_out32": SUMMARY, "bs1_in128_out32": SUMMARY,
                             "bs4_in32_out32": SUMMARY},
             "torch": {"bs1_in32_out32": SUMMARY, "bs4_in32_out32": SUMMARY}}
    # Runs CSV rows as read_runs returns them; a CSV from before the tp/pp columns has neither.
    runs = [{"backend": b, "scenario": k, "batch_size": float(k[2]), "prompt_length": float(k.split("_")[1][2:]),
             "output_length": 32.0, "tpot_ms": 1.0} for b, m in bench.items() for k in m if k != "load_s"]
    runs[-1] |= {"tp": 2.0, "pp": 1.0}
    table = tables.scenario_table(bench, runs)
    assert [(r["backend"], r["scenario"]) for r in table] == [
        ("onnxruntime", "bs4_in32_out32"), ("onnxruntime", "bs1_in128_out32"), ("onnxruntime", "bs4_in128_out32"),
        ("torch", "bs1_in32_out32"), ("torch", "bs4_in32_out32")]
    assert [(r["tp"], r["pp"]) for r in table] == [(1, 1)] * 4 + [(2, 1)]
    assert tables.scenario_order(table) == ["bs1_in32_out32", "bs4_in32_out32", "bs1_in128_out32", "bs4_in128_out32"]
    # Series per backend over the union of scenarios: a scenario a backend did not run is a gap, not a shift.
    by = tables.by_scenario(table, "tpot_ms_p50")
    assert by["torch"][:2] == [1.0, 1.0] and by["torch"][2] != by["torch"][2]  # NaN
    assert by["onnxruntime"][0] != by["onnxruntime"][0] and by["onnxruntime"][1:] == [1.0, 1.0, 1.0]
    assert tables.throughput_lines(table)[("onnxruntime", 128)] == [(1, 100.0), (4, 100.0)]
    assert tables.missing_runs(bench, runs[:-1]) == ["torch/bs4_in32_out32"]


def test_op_counts_most_frequent_first():
    graph = {"ops_before": {"Mul": 51, "MatMul": 37, "Add": 37}, "ops_after_ort": {"Mul": 39, "FusedMatMul": 4}}
    assert tables.op_counts(graph) == [("Mul", 51, 39), ("Add", 37, 0), ("MatMul", 37, 0), ("FusedMatMul", 0, 4)]


def test_dvc_yaml_declares_the_report_outputs_and_draws_them_per_backend():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc["stages"]["report"]
    data = REPORT_PLOT_DATA.as_posix()
    assert {HEADLINE_PATH.as_posix(): {"cache": False}} in stage["metrics"]
    (plot_out,) = stage["plots"]
    assert list(plot_out) == [data] and plot_out[data]["cache"] is False
    # The stage-level entry (DVC draws it on its own) and the top-level definitions all use the template
    # that colours by backend, over the scenarios, with y a field the report writes.
    definitions = [plot_out[data]] + [next(iter(p.values())) for p in dvc["plots"] if isinstance(p, dict)]
    drawn = set()
    for props in definitions:
        y = props["y"] if isinstance(props["y"], dict) else {data: props["y"]}
        assert list(y) == [data] and y[data] in tables.PLOT_DATA_FIELDS
        assert props["x"] == "scenario"
        template = json.loads((ROOT / props["template"]).read_text())
        assert template["encoding"]["color"]["field"] == "backend"
        drawn.add(y[data])
    assert {"tpot_ms_p50", "output_token_throughput", "ttft_ms_p50", "roofline_pct"} <= drawn
    pngs = {p for p in dvc["plots"] if isinstance(p, str)}
    assert pngs == {f"reports/{n}" for n in ("latency.png", "throughput.png", "tpot_distribution.png", "roofline.png",
                                             "accuracy.png", "onnx_ops.png", "serving.png")}
