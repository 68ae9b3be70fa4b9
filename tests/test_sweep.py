"""`python -m pipeline.sweep`: how a command line becomes jobs, and what is refused before any job is launched.
The sweeps that run (a real Hydra launcher, DVC experiments) are in tests/test_e2e.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pipeline import sweep
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import project_env


def test_each_combination_is_a_job_with_only_the_pipeline_overrides():
    jobs = sweep.expand(["-m", "precision=fp32,bf16", "benchmark.batch_sizes=[1],[4]", "hydra/launcher=submitit_local",
                         "hydra.launcher.timeout_min=30", "sweep.targets=[report]", "+serving.slo.e2el_ms=100"])
    assert jobs == [[p, b, "+serving.slo.e2el_ms=100"] for p in ("precision=fp32", "precision=bf16")
                    for b in ("benchmark.batch_sizes=[1]", "benchmark.batch_sizes=[4]")]
    assert sweep.expand(["precision=bf16"]) == [["precision=bf16"]]


def test_a_sweep_without_multirun_is_refused():
    with pytest.raises(PipelineError, match=r"2 combinations without -m: add -m \(--multirun\)"):
        sweep.expand(["precision=fp32,bf16"])


@pytest.mark.parametrize("name", ["a/b", "-x", "x y"])
def test_experiment_names_dvc_cannot_take_are_refused(name):
    with pytest.raises(PipelineError, match=f"override sweep.name={name}: experiment names take letters"):
        sweep.expand(["-m", "precision=fp32", f"sweep.name={name}"])


def test_dvc_command_passes_every_override_and_the_targets():
    cmd = sweep.dvc_command("s-1", ["precision=bf16", "benchmark.batch_sizes=[1,8]"], ["report"])
    assert cmd[1:] == ["-m", "dvc", "exp", "run", "--temp", "-n", "s-1", "-S", "precision=bf16",
                       "-S", "benchmark.batch_sizes=[1,8]", "report"]


def test_the_stages_own_error_line_is_what_a_failed_job_reports(tmp_path):
    log = tmp_path / "dvc.log"
    log.write_text("Running stage 'weights':\nerror: model.local_dir: /x is not a directory\n"
                   "ERROR: failed to reproduce 'weights': failed to run: python -m stages.weights, exited with 1\n")
    assert sweep.stage_error(log) == "error: model.local_dir: /x is not a directory"
    log.write_text("ERROR: unexpected error - [Errno 28] No space left on device\n\n")
    assert sweep.stage_error(log) == "ERROR: unexpected error - [Errno 28] No space left on device"


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=1,3"], "sweep job 1 (parallel.tp=3): conf/ (composed): parallel.tp must divide "
                          "model.num_heads=8; got 3"),
    (["precision=fp32,bf17"], "sweep job 1 (precision=bf17): override precision=bf17: conf/precision/ has no "
                              "option 'bf17'; did you mean 'bf16'?"),
    (["benchmark.batch_size=[1],[2]"], "sweep job 0 (benchmark.batch_size=[1]): override benchmark.batch_size=[1]: "
                                       "unknown key 'benchmark.batch_size'; did you mean 'benchmark.batch_sizes'?"),
])
def test_an_impossible_combination_is_one_line_and_nothing_is_launched(tmp_path, overrides, message):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "-m", *overrides, "hydra/launcher=submitit_local"],
                          cwd=tmp_path, env=project_env(COLUMNS="400"), capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and out.startswith(f"error: {message}") and out.endswith("nothing was launched")
    assert "\n" not in out and "Traceback" not in out
    assert [p.name for p in tmp_path.iterdir()] == ["conf"]  # no sweep directory, no submitit folder


def test_outside_a_repository_it_says_where_to_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "-m", "precision=fp32,bf16"], cwd=tmp_path,
                          env=project_env(COLUMNS="400"), capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and out.startswith("error: sweep job 0 (precision=fp32): ") and "\n" not in out
    assert out.endswith("conf/config.yaml: not found; run from the repository root; nothing was launched")
