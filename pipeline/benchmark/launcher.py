"""One fresh process per backend, so one backend's allocations, threads and compiled kernels never
colour another's numbers (optimum-benchmark's process launcher).

The launcher decides what runs: each backend's registry entry says which precisions and devices it can run,
whether it is distributed, and which artifact it loads. The launcher verifies that artifact's manifest once
and hands the backend its explicit path.

A worker that runs past its timeout (benchmark.timeout_s, serving.timeout_s) is stopped with everything it started;
one that crashes is recorded as failed with its reason, and the other backends still run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from pipeline import artifacts, paths
from pipeline.backends.registry import BackendSpec, spec
from pipeline.benchmark import hardware, roofline
from pipeline.benchmark.machine import environment_problem, model_shape
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.parallel import launch
from pipeline.progress import console


@dataclasses.dataclass
class Plan:
    jobs: dict[str, dict[str, Any]]   # backend -> job (what the worker gets)
    skipped: dict[str, str]           # backend -> why it does not run
    parallel: dict[str, Any]          # how parallel.tp x parallel.pp is covered
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # backend -> why its worker failed


def artifact_dir(backend: BackendSpec, precision: str) -> Path:
    """The verified directory of the artifact `backend` declares for `precision`."""
    kind = backend.artifact_for(precision)
    art = paths.ARTIFACTS[kind]
    manifest = artifacts.verify_manifest(art.path)
    if manifest.get("skipped"):
        raise PipelineError(f"{art.path}: not built ({manifest.get('reason')}); backend {backend.name} needs it: "
                            f"add {art.convert_format} to convert.formats or drop {backend.name} from benchmark.backends")
    return art.path


def lm_head_quantized(precision: str, artifact: Path) -> bool:
    """Whether lm_head is stored in 8 bits at `precision`. The ONNX int8 graph quantizes every MatMul that
    calibration.op_types covers except calibration.nodes_to_exclude (its manifest records both); the torch
    weight-quantized precisions quantize every nn.Linear, lm_head included (pipeline/model/quant.py). Float
    precisions: False."""
    if roofline.storage(precision).channel == 0:
        return False
    if precision != "int8":
        return True
    settings = artifacts.read_manifest(artifact).get("settings")
    if not isinstance(settings, dict) or "op_types" not in settings or "nodes_to_exclude" not in settings:
        raise PipelineError(f"{artifact}/{artifacts.MANIFEST}: no settings.op_types / settings.nodes_to_exclude; "
                            "rerun the calibrate stage (dvc repro)")
    return "MatMul" in settings["op_types"] and "lm_head" not in settings["nodes_to_exclude"]


def plan(cfg: PipelineConfig, vocab_size: int, names: list[str] | None = None, require_one: bool = True) -> Plan:
    """Jobs for `names` (default benchmark.backends): what each worker needs, the skipped ones and why."""
    names = list(cfg.benchmark.backends if names is None else names)
    jobs, skipped = {}, {}
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    hw = dataclasses.asdict(cfg.hardware)
    if not cfg.hardware.measure:  # fail before any worker starts, not after it loaded the model
        hardware.published(hw, roofline.peak_dtype(cfg.precision.name))
    shape = model_shape(paths.WEIGHTS_DIR)
    for name in names:
        backend = spec(name)
        why = backend.cannot_run(cfg.precision.name, cfg.hardware.device)
        if why:
            skipped[name] = why
            console.print(f"[yellow]benchmark: skipping backend {name}: {why}[/yellow]")
            continue
        # Asked for, declared able, but this machine lacks what it needs: fail now, before any worker starts.
        problem = environment_problem(cfg, backend, shape)
        if problem:
            raise PipelineError(f"backend {name} cannot run here: {problem} (python -m pipeline doctor lists what can)")
        artifact = artifact_dir(backend, cfg.precision.name)
        if backend.distributed:
            manifest = artifacts.read_manifest(artifact)
            if (manifest.get("tp"), manifest.get("pp")) != (tp, pp):
                raise PipelineError(f"{artifact}: converted for tp={manifest.get('tp')} pp={manifest.get('pp')}, "
                                    f"params.yaml asks tp={tp} pp={pp}; rerun its stage (dvc repro)")
        jobs[name] = {
            "inputs": {"backend": name, "artifact": artifact.as_posix(), "precision": cfg.precision.name,
                       "device": cfg.hardware.device, "num_threads": cfg.hardware.num_threads,
                       "compile": cfg.benchmark.compile, "compile_prefill": cfg.benchmark.compile_prefill,
                       "tp": tp if backend.own_parallelism else 1, "pp": pp if backend.own_parallelism else 1,
                       "options": cfg.dataclass_dict(backend.options) if backend.options else {}},
            "benchmark": dataclasses.asdict(cfg.benchmark), "vocab_size": vocab_size,
            "distributed": backend.distributed, "world_size": tp * pp if backend.distributed else 1,
            # The roofline's inputs: model shape, hardware figures (or measure them), how lm_head is stored.
            "model": shape, "hardware": hw,
            "lm_head_quantized": lm_head_quantized(cfg.precision.name, artifact),
            "timeout_s": cfg.benchmark.timeout_s, "timeout_key": "benchmark.timeout_s",
        }
    distributed = [n for n in jobs if spec(n).distributed]
    parallel: dict[str, Any] = {"tp": tp, "pp": pp}
    if tp * pp > 1 and not distributed:
        parallel["not_benchmarked"] = (f"parallel.tp={tp} x parallel.pp={pp} was not benchmarked: no distributed "
                                       f"backend ran (benchmark.backends={list(cfg.benchmark.backends)}; add torch-tp)")
        console.print(f"[yellow]benchmark: {parallel['not_benchmarked']}[/yellow]")
    else:
        parallel["benchmarked_by"] = distributed
    if not jobs and require_one:
        raise PipelineError(f"none of {names} can run precision.name="
                            f"{cfg.precision.name} on hardware.device={cfg.hardware.device} "
                            f"({'; '.join(skipped.values())})")
    return Plan(jobs, skipped, parallel)


def serve_plan(cfg: PipelineConfig, vocab_size: int, requests: list, warmup: list) -> Plan:
    """Jobs of the serve stage: benchmark jobs for serving.backends plus the serving settings and the requests
    (the same list for every backend: [id, prompt ids, output tokens])."""
    todo = plan(cfg, vocab_size, cfg.serving.backends, require_one=False)
    settings = dataclasses.asdict(cfg.serving)
    rows = [[r.id, list(r.prompt), r.max_new_tokens] for r in requests]
    warm = [[r.id, list(r.prompt), r.max_new_tokens] for r in warmup]
    for job in todo.jobs.values():
        job.update(mode="serve", serving=settings, requests=rows, warmup=warm, timeout_s=cfg.serving.timeout_s,
                   timeout_key="serving.timeout_s")
    return todo


def worker_command(job: dict[str, Any], job_path: Path, result_path: Path) -> list[str]:
    args = [str(job_path), str(result_path)]
    if job["distributed"]:
        # Every rank runs the same worker (SPMD); rank 0 writes the result.
        return launch.torchrun_command(job["world_size"], "pipeline.benchmark.worker", args)
    return [sys.executable, "-m", "pipeline.benchmark.worker", *args]


# After SIGTERM, how long a worker gets before SIGKILL: torchrun uses it to stop its ranks, CUDA to release memory.
STOP_GRACE_S = 5.0


class WorkerFailed(PipelineError):
    """A backend's worker crashed, ran past its timeout or wrote no result; the message is the reason."""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S, to the worker, its process group and every process under it
    (torchrun starts each rank in a session of its own, so the group alone would miss them)."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGTERM:
            _, tree = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
            if not tree:
                break
    proc.wait()


def _failure(code: int, error_files: list[Path]) -> str:
    """Why a worker failed: the error line it recorded, else how it ended."""
    for path in error_files:  # rank 0 first
        with contextlib.suppress(OSError):
            reason = path.read_text().strip()
            if reason:
                return reason
    if code < 0:
        return f"killed by {signal.Signals(-code).name}; see its output above"
    return f"exited with code {code}; see its output above" if code else "exited without writing a result"


def run_job(name: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one backend's worker to completion or job["timeout_s"]; raises WorkerFailed naming why it failed."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        # Where each rank records its error line ({rank} is filled in by worker.py), and the pid it must not outlive.
        job = {**job, "error_path": str(Path(tmp) / "error-{rank}.txt"), "launcher_pid": os.getpid()}
        job_path.write_text(json.dumps(job))
        # A process group of its own, so a timeout stops it with whatever it started (a stage killed by Ctrl-C
        # stops it in the finally below).
        proc = subprocess.Popen(worker_command(job, job_path, result_path), process_group=0)
        try:
            proc.wait(timeout=job["timeout_s"])
        except subprocess.TimeoutExpired:
            raise WorkerFailed(f"timed out after {job['timeout_s']:g} s ({job['timeout_key']})") from None
        finally:
            if proc.returncode is None:
                _stop(proc)
        if proc.returncode != 0 or not result_path.is_file():
            raise WorkerFailed(_failure(proc.returncode, sorted(Path(tmp).glob("error-*.txt"))))
        return json.loads(result_path.read_text())


def run_jobs(jobs: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every job in turn, each in a fresh process; returns ({backend: result}, {backend: why it failed})."""
    results, failed = {}, {}
    for name, job in jobs.items():
        try:
            results[name] = run_job(name, job)
        except WorkerFailed as e:
            failed[name] = str(e)
            console.print(f"[red]backend {name} failed:[/red] {e}", highlight=False)
    return results, failed


def _run_plan(todo: Plan, what: str) -> dict[str, dict[str, Any]]:
    results, todo.failed = run_jobs(todo.jobs)
    if todo.jobs and not results:
        raise PipelineError(f"every {what} backend failed: " + "; ".join(f"{n}: {why}" for n, why in todo.failed.items()))
    return results


def run_all(cfg: PipelineConfig, vocab_size: int) -> tuple[dict[str, dict[str, Any]], Plan]:
    """Run every backend the plan admits; returns ({backend: result}, plan with plan.failed). Raises when every
    backend that ran failed."""
    todo = plan(cfg, vocab_size)
    return _run_plan(todo, "benchmark"), todo


def run_serving(cfg: PipelineConfig, vocab_size: int, requests: list, warmup: list) -> tuple[dict[str, Any], Plan]:
    """The serve stage's backends, one process each; returns ({backend: result}, plan)."""
    todo = serve_plan(cfg, vocab_size, requests, warmup)
    return _run_plan(todo, "serving"), todo
