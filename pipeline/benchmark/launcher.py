"""One fresh process per backend, so one backend's allocations, threads and compiled kernels never
colour another's numbers (optimum-benchmark's process launcher)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.progress import console


def worker_command(name: str, params_path: Path, model_dir: Path, result_path: Path, world_size: int) -> list[str]:
    from pipeline.backends.registry import load_backend_class

    launch = [sys.executable]
    if load_backend_class(name).distributed:
        # Every rank runs the same worker (SPMD); rank 0 writes the result.
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
    return [*launch, "-m", "pipeline.benchmark.worker", name, str(params_path), str(model_dir), str(result_path)]


def run_backend_in_subprocess(name: str, params_path: Path, model_dir: Path, world_size: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = worker_command(name, params_path, model_dir, result_path, world_size)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not result_path.is_file():
            raise PipelineError(f"benchmark backend '{name}' failed (exit code {proc.returncode}); see its error above")
        return json.loads(result_path.read_text())


def run_all(cfg: PipelineConfig, params_path: Path, model_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every configured backend that supports precision.name; returns (results, {skipped: why})."""
    from pipeline.backends.registry import load_backend_class

    results, skipped = {}, {}
    for name in cfg.benchmark.backends:
        supported = load_backend_class(name).supported_precisions
        if cfg.precision.name not in supported:
            skipped[name] = f"precision.name={cfg.precision.name} not supported (runs {', '.join(supported)})"
            console.print(f"[yellow]benchmark: skipping backend {name}: {skipped[name]}[/yellow]")
            continue
        results[name] = run_backend_in_subprocess(name, params_path, model_dir, cfg.parallel.world_size)
    if not results:
        raise PipelineError(f"precision.name={cfg.precision.name}: none of benchmark.backends="
                            f"{list(cfg.benchmark.backends)} can run it ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return results, skipped
