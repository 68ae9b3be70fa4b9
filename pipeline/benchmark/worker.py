"""Child process of the benchmark and serve stages: load one backend, run every scenario (or, for a job of
mode "serve", every serving load point), write JSON.

Everything it needs comes in one job file written by the launcher (backend name, the explicit artifact path,
precision, device, benchmark settings, and for the roofline the model shape, the hardware figures or whether to
measure them, and whether lm_head is 8-bit); it reads no params.yaml and guesses no path."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import torch

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.backends.base import BackendInputs
from pipeline.backends.registry import load_backend_class
from pipeline.benchmark.runner import RooflineInputs, benchmark_backend
from pipeline.benchmark.serving import serve_backend
from pipeline.config import BenchmarkConfig
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.progress import console


def record_failure(job: dict, reason: str) -> None:
    """The one line the launcher records as this backend's failure (each rank writes its own file)."""
    lines = reason.strip().splitlines() or ["no message"]
    atomic_write_text(Path(job["error_path"].format(rank=os.environ.get("RANK", "0"))), lines[0] + "\n")


def stop_with_launcher(job: dict, every_s: float = 1.0) -> None:
    """Exit when the stage that launched this worker is gone. A stage killed outright (SIGKILL, OOM killer) cannot
    stop its worker, which would otherwise hold the GPU as an orphan; every torchrun rank watches for itself, and
    torchrun ends when its ranks do. is_running() compares the start time too, so a reused pid is not mistaken."""
    launcher = psutil.Process(job["launcher_pid"])

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                gone = not launcher.is_running() or launcher.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                os._exit(1)

    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    if "launcher_pid" in job:  # set by the launcher; a worker started by hand (debugging) has none to watch
        stop_with_launcher(job)
    try:
        inputs = BackendInputs(**{**job["inputs"], "artifact": Path(job["inputs"]["artifact"])})
        if inputs.num_threads:
            torch.set_num_threads(inputs.num_threads)
        backend = load_backend_class(inputs.backend)(inputs)
        try:
            if job.get("mode") == "serve":
                result = serve_backend(backend, job)
            else:
                roof = RooflineInputs(LlamaArgs(**job["model"]), job["hardware"], job["lm_head_quantized"])
                result = benchmark_backend(backend, BenchmarkConfig(**job["benchmark"]),
                                           vocab_size=job["vocab_size"], roof=roof)
        finally:
            backend.close()
    except PipelineError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        record_failure(job, str(e))
        return 1
    except Exception as e:
        # Unforeseen: the traceback is for whoever debugs it, the launcher records its last line.
        traceback.print_exc()
        record_failure(job, f"{type(e).__name__}: {e}")
        return 1
    if backend.is_reporting_rank:
        atomic_write_json(Path(result_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
