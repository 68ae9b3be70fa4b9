"""dvc.yaml and the code agree: same output paths, deps that exist, params sections that exist."""

from __future__ import annotations

import yaml

from pipeline import paths
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_stage_outputs_are_the_paths_the_code_writes():
    assert _paths(DVC["weights"]["outs"]) == {paths.WEIGHTS_DIR.as_posix()}
    assert _paths(DVC["weights"]["metrics"]) == {paths.WEIGHTS_METRICS.as_posix()}
    assert _paths(DVC["benchmark"]["metrics"]) == {paths.BENCHMARK_METRICS.as_posix()}
    assert _paths(DVC["benchmark"]["plots"]) == {paths.BENCHMARK_RUNS.as_posix()}
    assert _paths(DVC["benchmark"]["outs"]) == {paths.BENCHMARK_CONDITIONS.as_posix()}
    assert _paths(DVC["report"]["outs"]) == {paths.REPORT_DIR.as_posix()}


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
