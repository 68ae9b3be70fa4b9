"""Child process of the benchmark stage: load one backend, run every scenario, write JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline import config
from pipeline.artifacts import atomic_write_json
from pipeline.backends.registry import load_backend_class
from pipeline.benchmark.runner import benchmark_backend
from pipeline.errors import PipelineError
from pipeline.progress import console


def main(argv: list[str]) -> int:
    name, params_path, model_dir, result_path = argv
    try:
        cfg = config.load(params_path)
        if cfg.hardware.num_threads:
            torch.set_num_threads(cfg.hardware.num_threads)
        model_config = json.loads((Path(model_dir) / "config.json").read_text())
        backend = load_backend_class(name)(Path(model_dir), cfg.precision, cfg.hardware)
        try:
            result = benchmark_backend(backend, cfg.benchmark, vocab_size=int(model_config["vocab_size"]))
        finally:
            backend.close()
    except PipelineError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    if backend.is_reporting_rank:
        atomic_write_json(Path(result_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
