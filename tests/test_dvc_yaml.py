"""dvc.yaml and the code agree: same output paths, deps that exist, params sections that exist."""

from __future__ import annotations

import yaml

from pipeline import paths
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def _posix(*items) -> set[str]:
    return {p.as_posix() for p in items}


def test_stage_outputs_are_the_paths_the_code_writes():
    assert _paths(DVC["weights"]["outs"]) == _posix(paths.WEIGHTS_DIR, paths.WEIGHTS_METRICS)
    assert _paths(DVC["export_onnx"]["outs"]) == _posix(paths.ONNX_DIR, paths.ONNX_GRAPH, paths.EXPORT_METRICS)
    assert _paths(DVC["calibrate"]["outs"]) == _posix(paths.INT8_DIR, paths.CALIBRATE_METRICS)
    assert _paths(DVC["evaluate"]["outs"]) == _posix(paths.EVALUATE_METRICS)
    assert _paths(DVC["convert_ft"]["outs"]) == _posix(paths.FT_DIR)
    assert _paths(DVC["convert_trtllm"]["outs"]) == _posix(paths.TRTLLM_DIR)
    assert _paths(DVC["verify_parallel"]["outs"]) == _posix(paths.VERIFY_METRICS)
    assert _paths(DVC["benchmark"]["outs"]) == _posix(paths.BENCHMARK_METRICS, paths.BENCHMARK_CONDITIONS,
                                                      paths.BENCHMARK_RUNS)
    assert _paths(DVC["report"]["outs"]) == _posix(paths.REPORT_DIR)
    assert _paths(DVC["report"]["plots"]) == _posix(paths.REPORT_PLOT_DATA)


def test_only_the_headline_file_is_dvc_metrics():
    """`dvc exp show` shows the declared metrics: the short headline file, not every stage's detail."""
    declared = {p for s in DVC.values() for p in _paths(s.get("metrics"))}
    assert declared == _posix(paths.HEADLINE_METRICS)


def test_every_stage_runs_its_own_entry_point_and_lists_it_as_a_dep():
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"]


def test_source_deps_exist_and_params_sections_exist():
    produced = {p for s in DVC.values() for key in ("outs", "metrics", "plots") for p in _paths(s.get(key))}
    for name, stage in DVC.items():
        for dep in stage["deps"]:
            assert (ROOT / dep).exists() or any(dep == p or dep.startswith(p + "/") for p in produced), (name, dep)
        for section in stage.get("params", []):
            assert section.split(".")[0] in PARAMS, (name, section)
