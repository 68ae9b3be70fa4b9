"""dvc.yaml's deps are what each stage's code loads: for every stage, the closure of project modules that
stages/<name>.py imports (also inside functions, also via registry strings and `python -m` module names) must
be covered by its deps, and every code dep must be in that closure. Otherwise an edit to a module would not
rerun the stage that uses it, or would rerun one that does not."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import ROOT
from tests.import_graph import closure, is_code_free

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# Modules that cannot change a stage's outputs, so editing them must not rerun the pipeline (their own imports
# are not followed: they serve them, not the stage):
NOT_DEPS = {
    "stages/_main.py",         # turns a PipelineError into one line and exit code 1
    "pipeline/errors.py",      # the exception types
    "pipeline/progress.py",    # progress bars and console messages
    "pipeline/tracking.py",    # MLflow mirror of the outputs (DVC's outputs are the source of truth)
    "pipeline/lineage.py",     # git/DVC facts tagged on MLflow runs
    "pipeline/paths.py",       # where outputs go: dvc.yaml lists the same paths (tests/test_dvc_yaml.py)
}


def _code_files(stage: str) -> set[str]:
    start = ROOT / "stages" / f"{stage}.py"
    stop = frozenset(ROOT / p for p in NOT_DEPS)
    files = closure(start, stop)
    return {f.relative_to(ROOT).as_posix() for f in files
            if f.relative_to(ROOT).as_posix() not in NOT_DEPS and not (f.name == "__init__.py" and is_code_free(f))}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_deps_cover_every_module_the_stage_loads(stage):
    deps = DVC[stage]["deps"]
    missing = sorted(f for f in _code_files(stage) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} loads these modules without depending on them: {missing}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_code_dep_is_loaded_by_the_stage(stage):
    used = _code_files(stage)
    for dep in DVC[stage]["deps"]:
        target = ROOT / dep
        if not dep.startswith(("pipeline/", "stages/")) or dep.endswith(".txt"):
            continue  # artifacts, metrics and data files: not code
        files = [target] if target.is_file() else sorted(target.rglob("*.py"))
        unused = [f.relative_to(ROOT).as_posix() for f in files
                  if f.relative_to(ROOT).as_posix() not in used and not (f.name == "__init__.py" and is_code_free(f))]
        assert not unused, f"dvc.yaml stage {stage!r} depends on {dep} but never loads {unused}"


def test_allow_list_names_real_modules():
    assert all((ROOT / p).is_file() for p in NOT_DEPS)
