"""Faults of processes (issue 19, class 5), with real processes: a benchmark worker that hangs or crashes, a
stage killed with SIGKILL mid-write, and two runs writing the same output at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.benchmark import launcher
from pipeline.errors import PipelineError
from tests.conftest import ROOT
from tests.helpers import copy_project, project_env

# A worker that hangs: it starts a child of its own (as torchrun starts ranks), writes both pids, sleeps.
HANG = ("import subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "pathlib.Path(sys.argv[1]).write_text(f'{child.pid}')\n"
        "time.sleep(120)\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a killed parent is reaped by init; until then it is a zombie, i.e. dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _fake_workers(monkeypatch, tmp_path: Path, scripts: dict[str, str]) -> None:
    """worker_command of backend `name` runs scripts[name] (argv: a pid file, the job file, the result file)."""
    def command(job, job_path, result_path):
        name = job["inputs"]["backend"]
        return [sys.executable, "-c", scripts[name], str(tmp_path / f"{name}.pid"), str(job_path), str(result_path)]
    monkeypatch.setattr(launcher, "worker_command", command)


def _job(name: str, timeout_s: float = 2.0) -> dict:
    return {"inputs": {"backend": name}, "distributed": False, "timeout_s": timeout_s,
            "timeout_key": "benchmark.timeout_s"}


def test_hung_worker_is_killed_with_its_children_and_the_others_still_run(tmp_path, monkeypatch):
    ok = "import sys, json, pathlib; pathlib.Path(sys.argv[3]).write_text(json.dumps({'ok': 1}))\n"
    _fake_workers(monkeypatch, tmp_path, {"hangs": HANG, "works": ok})
    started = time.time()
    results, failed = launcher.run_jobs({"hangs": _job("hangs"), "works": _job("works")})
    assert time.time() - started < 20
    assert results == {"works": {"ok": 1}}
    assert failed == {"hangs": "timed out after 2 s (benchmark.timeout_s)"}
    child = int((tmp_path / "hangs.pid").read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the hung worker's own child process survived"


def test_a_worker_stops_when_its_stage_is_killed_outright(tmp_path):
    # A stage killed with SIGKILL cannot stop its worker; the worker (every rank) watches the launcher's pid.
    worker = ("import json, pathlib, sys, time\n"
              "from pipeline.benchmark.worker import stop_with_launcher\n"
              "stop_with_launcher(json.loads(pathlib.Path(sys.argv[2]).read_text()), every_s=0.1)\n"
              "pathlib.Path(sys.argv[1]).write_text(str(__import__('os').getpid()))\n"
              "time.sleep(120)\n")
    stage = ("import sys\n"
             "from pipeline.benchmark import launcher\n"
             f"launcher.worker_command = lambda job, j, r: [sys.executable, '-c', {worker!r}, {str(tmp_path / 'w.pid')!r}, str(j), str(r)]\n"
             "launcher.run_jobs({'hangs': {'inputs': {'backend': 'hangs'}, 'distributed': False, 'timeout_s': 120, "
             "'timeout_key': 'benchmark.timeout_s'}})\n")
    proc = subprocess.Popen([sys.executable, "-c", stage], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "w.pid").is_file() and time.time() < deadline:
            time.sleep(0.05)
        pid = int((tmp_path / "w.pid").read_text())
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its killed stage"
    finally:
        proc.kill()


def test_crashed_worker_is_recorded_with_its_last_error_line(tmp_path):
    # The real worker, handed a job that lacks the model shape: it crashes with a traceback (on its stderr); the
    # reason recorded is the traceback's last line.
    job = {"inputs": {"backend": "onnxruntime", "artifact": str(tmp_path / "nowhere"), "precision": "fp32",
                      "device": "cpu", "num_threads": 1}, "distributed": False, "timeout_s": 120,
           "timeout_key": "benchmark.timeout_s"}
    results, failed = launcher.run_jobs({"onnxruntime": job})
    assert results == {}
    assert failed == {"onnxruntime": "KeyError: 'model'"}


def test_a_crash_without_a_reason_says_how_it_ended(tmp_path, monkeypatch):
    _fake_workers(monkeypatch, tmp_path, {"segv": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)\n",
                                          "exit3": "import sys; sys.exit(3)\n"})
    _, failed = launcher.run_jobs({"segv": _job("segv"), "exit3": _job("exit3")})
    assert failed["segv"].startswith("killed by SIGSEGV"), failed
    assert failed["exit3"].startswith("exited with code 3"), failed


def _bench_workspace(tmp_path: Path, tiny_model_dir: Path, monkeypatch, crash: tuple[str, ...]) -> None:
    """A workspace with the tiny weights and a small CPU benchmark of torch and torch-compiled; the backends in
    `crash` get a worker that exits 3 at once, the others the real one."""
    import shutil

    from pipeline import compose

    shutil.copytree(tiny_model_dir, tmp_path / "artifacts" / "weights")
    raw = compose.compose_params(ROOT / "conf", ["tracking=off", "benchmark.backends=[torch,torch-compiled]",
                                                 "benchmark.prompt_lengths=[8]", "benchmark.batch_sizes=[1]",
                                                 "benchmark.output_length=4", "benchmark.warmup_runs=0",
                                                 "benchmark.measured_runs=2"])
    compose.write_params(raw, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    real = launcher.worker_command
    monkeypatch.setattr(launcher, "worker_command", lambda job, job_path, result_path: (
        [sys.executable, "-c", "import sys; sys.exit(3)"] if job["inputs"]["backend"] in crash
        else real(job, job_path, result_path)))


def test_benchmark_stage_records_a_failed_backend_and_the_report_shows_it(tmp_path, tiny_model_dir, monkeypatch):
    from pipeline import report
    from stages import benchmark

    _bench_workspace(tmp_path, tiny_model_dir, monkeypatch, crash=("torch-compiled",))
    benchmark.main()  # before: PipelineError "benchmark backend 'torch-compiled' failed", no outputs
    metrics = json.loads(Path("metrics/benchmark.json").read_text())
    conditions = json.loads(Path("metrics/benchmark_conditions.json").read_text())
    assert list(metrics) == ["torch"]
    assert conditions["torch-compiled"] == {"failed": "exited with code 3; see its output above"}
    Path("metrics/weights.json").write_text(json.dumps({"bytes": 1, "seconds": 1}))
    inputs = report.ReportInputs(benchmark=Path("metrics/benchmark.json"),
                                 conditions=Path("metrics/benchmark_conditions.json"),
                                 runs=Path("plots/benchmark_runs.csv"), weights_metrics=Path("metrics/weights.json"),
                                 weights_dir=Path("artifacts/weights"))
    built = report.build(inputs, Path("reports"), headline_path=Path("metrics/headline.json"))
    assert built["headline"]["torch-compiled"] == {"failed": "exited with code 3; see its output above"}
    assert "torch" in built["headline"] and "failed" not in built["headline"]["torch"]
    assert ("**Backend `torch-compiled` FAILED**: exited with code 3; see its output above."
            in Path("reports/report.md").read_text())
    from pipeline import tracking
    assert all(k.startswith("torch.") for k in tracking.numeric(built["headline"]))  # the reason is no metric


def test_benchmark_stage_fails_in_one_line_when_every_backend_failed(tmp_path, tiny_model_dir, monkeypatch):
    from stages import benchmark

    _bench_workspace(tmp_path, tiny_model_dir, monkeypatch, crash=("torch", "torch-compiled"))
    with pytest.raises(PipelineError) as err:
        benchmark.main()
    assert str(err.value) == ("every benchmark backend failed: torch: exited with code 3; see its output above; "
                              "torch-compiled: exited with code 3; see its output above")
    assert not Path("metrics").exists()


def _start_and_wait(script: str, ready: Path, cwd: Path = ROOT, pattern: str | None = None) -> subprocess.Popen:
    """Start a writer; return once `ready` exists (or, with pattern, a file matching it under cwd)."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env=project_env(PYTHONPATH=str(ROOT)))
    deadline = time.time() + 60
    there = (lambda: any(cwd.glob(pattern))) if pattern else ready.exists
    while not there() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert there(), "the writer never got to its controlled point"
    return proc


def test_second_writer_of_one_output_fails_in_one_line_and_the_first_completes(tmp_path):
    target, ready = tmp_path / "out", tmp_path / "ready"
    first = _start_and_wait(
        "import time; from pathlib import Path; from pipeline import artifacts\n"
        f"with artifacts.atomic_dir(Path({str(target)!r})) as tmp:\n"
        "    (tmp / 'a').write_text('first')\n"
        f"    Path({str(ready)!r}).write_text('1'); time.sleep(2)\n"
        "    (tmp / 'b').write_text('first')\n", ready)
    # Before: the second run removed the first one's .partial mid-write (the first then crashed on 'b').
    with pytest.raises(PipelineError) as err:
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "a").write_text("second")
    assert str(err.value) == (f"{target}: another run is writing it (pid {first.pid}) into {target}.partial; "
                              "wait for it to finish or stop it, then rerun")
    assert first.wait(30) == 0
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"] and (target / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]


def test_concurrent_writers_of_one_file_each_write_a_whole_file(tmp_path):
    # Before: both wrote `<file>.tmp`; one's os.replace moved the other's half-written temp file into place
    # (or failed with FileNotFoundError).
    path, go = tmp_path / "metrics.json", tmp_path / "go"
    script = ("import sys, time; from pathlib import Path; from pipeline import artifacts\n"
              f"while not Path({str(go)!r}).exists(): time.sleep(0.001)\n"
              "for i in range(200): artifacts.atomic_write_bytes("
              f"Path({str(path)!r}), sys.argv[1].encode() * 200_000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, c], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for c in "ab"]
    time.sleep(1.0)
    go.write_text("1")
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    assert path.read_bytes() in (b"a" * 200_000, b"b" * 200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "metrics.json"]


def test_verify_cache_is_safe_under_concurrent_stages(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for i in range(20):
        (art / f"f{i}.bin").write_bytes(os.urandom(50_000))
    artifacts.write_manifest(art)
    time.sleep(artifacts.RACY_NS / 1e9 + 0.2)  # settled files: their hashes are cached
    script = ("from pathlib import Path; from pipeline import artifacts\n"
              f"for _ in range(30): artifacts.verify_manifest(Path({str(art)!r}), Path({str(tmp_path / 'cache')!r}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 20
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_what_killed_runs_left_is_removed_by_the_next_stage(tmp_path):
    """SIGKILL at controlled points of atomic_dir (partial written; old moved aside during the swap), of
    atomic_write (temp file half written) and of a stage's scratch directory; then any stage's next run."""
    project = tmp_path / "p"
    (project / "artifacts" / "ft").mkdir(parents=True)
    (project / "metrics").mkdir()
    kills = {
        # a partial of an output no stage writes any more (parallel.tp changed since)
        "artifacts/ft/2-gpu.partial": "with artifacts.atomic_dir(Path('artifacts/ft/2-gpu')) as tmp:\n"
                                      "    (tmp / 'rank0.bin').write_bytes(b'x' * 1000); ready(); time.sleep(60)\n",
        # a metrics file being written (300 MB: the test polls for its temp file)
        "metrics/benchmark.json*.tmp": "artifacts.atomic_write_bytes(Path('metrics/benchmark.json'), b'x' * 300_000_000)\n",
        # the previous output moved aside during the swap, not yet removed (killed while removing it)
        # (the test polls for the .old: the 30,000 files take a while to remove)
        "artifacts/weights.old": "Path('artifacts/weights').mkdir()\n"
                                 "for i in range(30000): Path(f'artifacts/weights/{i}').touch()\n"
                                 "with artifacts.atomic_dir(Path('artifacts/weights')) as tmp:\n"
                                 "    (tmp / 'new').touch()\n",
        # a stage's temp directory (ONNX export scratch, benchmark job files)
        ".cache/tmp/*.partial": "with artifacts.scratch_dir(Path('.cache/tmp')):\n"
                                "    import tempfile; d = tempfile.mkdtemp(prefix='ort-opt-')\n"
                                "    Path(d, 'model.onnx').write_bytes(b'x' * 1000); ready(); time.sleep(60)\n",
        # the report's directory, built in the project root
        "reports.partial": "with artifacts.atomic_dir(Path('reports')) as tmp:\n"
                           "    (tmp / 'report.md').write_text('half'); ready(); time.sleep(60)\n",
    }
    for i, (pattern, body) in enumerate(kills.items()):
        ready = tmp_path / f"ready{i}"
        script = ("import os, time; from pathlib import Path; from pipeline import artifacts\n"
                  f"def ready(): Path({str(ready)!r}).write_text('1'); time.sleep(60)\n" + body)
        polled = pattern if "ready()" not in body else None
        proc = _start_and_wait(script, ready, cwd=project, pattern=polled)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert list(project.glob(pattern)), pattern
    (project / "metrics" / "notes.txt").write_text("a user's file")  # not ours: stays
    # Any stage's next run (this one stops at once: there is no params.yaml here).
    proc = subprocess.run([sys.executable, "-m", "stages.benchmark"], cwd=project, capture_output=True, text=True,
                          env=project_env(PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 1 and "params.yaml" in proc.stderr, proc.stderr
    left = sorted(p.relative_to(project).as_posix() for p in project.rglob("*"))
    assert left == [".cache", ".cache/tmp", "artifacts", "artifacts/ft", "artifacts/weights", "artifacts/weights/new",
                    "metrics", "metrics/notes.txt"], left


@pytest.mark.slow
def test_two_runs_in_one_workspace_and_a_killed_dvc_repro(tmp_path):
    """A second `dvc repro` fails on DVC's lock; `dvc repro` killed with SIGKILL mid-write leaves a .partial that
    the next run removes; two runs of one stage outside DVC at once: one writes, the other fails in one line on
    the output's lock (before: it deleted the other's .partial mid-write); at the end neither git nor DVC
    reports anything left over."""
    project = copy_project(tmp_path / "project")
    env = project_env()
    partial = project / "artifacts" / "weights.partial"
    first = subprocess.Popen(["dvc", "repro", "weights"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not partial.exists() and time.time() < deadline:
            time.sleep(0.01)
        assert partial.exists()
        second = subprocess.run(["dvc", "repro", "weights"], cwd=project, env=env, capture_output=True, text=True)
        assert second.returncode != 0 and "is busy" in second.stderr, second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dvc and the stage it runs
        first.wait()
    assert partial.exists()
    both = [subprocess.Popen([sys.executable, "-m", "stages.weights"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    ended = sorted((p.wait(300), p.stderr.read()) for p in both)
    assert [code for code, _ in ended] == [0, 1], ended
    assert ended[1][1].strip().splitlines()[-1].startswith(
        "error: artifacts/weights: another run is writing it (pid "), ended[1][1]
    assert "removed artifacts/weights.partial, left by a killed run" in ended[0][1] + ended[1][1]
    subprocess.run(["dvc", "repro", "weights"], cwd=project, env=env, check=True, capture_output=True, timeout=600)
    assert (project / "artifacts" / "weights" / "manifest.json").is_file()
    git = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True)
    assert git.stdout == "?? dvc.lock\n", git.stdout  # dvc.lock is a product (the copy is a fresh clone)
    litter = [p for p in project.rglob("*") if p.name.endswith(artifacts.STALE_SUFFIXES) and ".git" not in p.parts]
    assert litter == []
    dvc = subprocess.run(["dvc", "status", "weights"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in dvc.stdout, dvc.stdout


def test_serve_outputs_and_report_record_a_failed_backend(tmp_path):
    from pipeline.benchmark import results
    from pipeline.report import markdown

    why = "timed out after 1800 s (serving.timeout_s)"
    summary = results.write_serving({}, "fp32", {"slo": {}}, tmp_path / "s.json", tmp_path / "c.json",
                                    tmp_path / "r.jsonl", failed={"torch-compiled": why})
    assert summary["failed"] == {"torch-compiled": why}
    assert json.loads((tmp_path / "c.json").read_text()) == {"torch-compiled": {"failed": why}}
    assert f"**Backend `torch-compiled` FAILED**: {why}." in markdown._serving_section(summary)


@pytest.mark.parametrize("override", ["benchmark.timeout_s=0", "serving.timeout_s=-5", "benchmark.timeout_s=nan",
                                      "serving.timeout_s=inf"])
def test_worker_timeouts_are_checked_at_compose_time(override):
    from pipeline import compose
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        compose.compose_params(ROOT / "conf", [override])
