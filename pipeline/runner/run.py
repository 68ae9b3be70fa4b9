"""Entry point of one TP x PP rank; launch tp*pp of them with torchrun:

    torchrun --standalone --nproc-per-node=4 -m pipeline.runner.run --format trtllm \\
        --checkpoint artifacts/trtllm/tp2pp2 --tp 2 --pp 2 --prompt-ids 5,17,42 --prompt-ids 9,8,7,6 \\
        --max-new-tokens 8 --output result.json

Rank 0 writes result.json (generated tokens, timings) and result.logits.safetensors (the prompt logits,
float32 [s, V] per prompt, key prompt{i}). gloo on CPU, nccl on GPU (one GPU per rank, LOCAL_RANK)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipeline import artifacts
from pipeline.convert.load import load_stage
from pipeline.errors import PipelineError
from pipeline.parallel.launch import init_rank, process_group_backend, shutdown
from pipeline.parallel.mapping import Mapping
from pipeline.parallel.pp import Stage
from pipeline.parallel.tp import apply_tp, new_tp_group
from pipeline.precision import FLOAT_PRECISIONS

ERROR_PREFIX = "pipeline.runner.run: error: "


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.runner.run", description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, choices=("ft", "trtllm"))
    p.add_argument("--checkpoint", required=True, type=Path, help="the converter's out_dir (has manifest.json)")
    p.add_argument("--tp", required=True, type=int)
    p.add_argument("--pp", required=True, type=int)
    p.add_argument("--prompt-ids", required=True, action="append",
                   help="comma-separated token ids; repeat for several prompts")
    p.add_argument("--max-new-tokens", required=True, type=int)
    p.add_argument("--output", required=True, type=Path, help="result.json written by rank 0")
    p.add_argument("--logits", type=Path, help="default: <output stem>.logits.safetensors")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl if CUDA is available, else gloo")
    p.add_argument("--dtype", choices=FLOAT_PRECISIONS, help="compute dtype; default: the checkpoint's")
    return p.parse_args(argv)


def _prompts(raw: list[str]) -> list[list[int]]:
    try:
        prompts = [[int(t) for t in s.split(",") if t.strip()] for s in raw]
    except ValueError:
        raise PipelineError(f"--prompt-ids must be comma-separated integers; got {raw!r}") from None
    if any(not p for p in prompts):
        raise PipelineError("--prompt-ids: every prompt needs at least one token id")
    return prompts


def main(argv: Optional[list[str]] = None) -> int:
    opts = _parse(argv)
    backend = opts.backend or process_group_backend("cuda" if torch.cuda.is_available() else "cpu")
    try:
        prompts = _prompts(opts.prompt_ids)
        if opts.max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens must be >= 1; got {opts.max_new_tokens}")
        device = init_rank("cuda" if backend == "nccl" else "cpu",
                           f"launch with torchrun --nproc-per-node={opts.tp * opts.pp} -m pipeline.runner.run ...")
        mapping = Mapping(opts.tp, opts.pp, rank=dist.get_rank(), world_size=dist.get_world_size())
        model, info = load_stage(opts.format, opts.checkpoint, mapping, device, opts.dtype)
        args = model.args
        for prompt in prompts:
            bad = [t for t in prompt if not 0 <= t < args.vocab_size]
            if bad:
                raise PipelineError(f"--prompt-ids: token {bad[0]} is outside the vocabulary [0, {args.vocab_size})")
        apply_tp(model, new_tp_group(mapping), mapping.tp)
        stage = Stage(model, mapping, device)
        results, logits = [], {}
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            out = stage.generate(prompt, opts.max_new_tokens)
            full = stage.logits_to_rank0(out.pop("logits"), len(prompt))
            if mapping.rank == 0:
                logits[f"prompt{i}"] = full.cpu().contiguous()
            results.append(out)
        if mapping.rank == 0:
            _write(opts, backend, info, prompts, results, logits, time.perf_counter() - t0)
        shutdown()
        return 0
    except PipelineError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        return 1


def _write(opts, backend: str, info: dict, prompts, results, logits, wall_s: float) -> None:
    from safetensors.torch import save_file

    logits_path = opts.logits or opts.output.with_name(opts.output.stem + ".logits.safetensors")
    logits_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = logits_path.with_name(logits_path.name + ".tmp")
    save_file(logits, str(tmp))
    os.replace(tmp, logits_path)
    artifacts.atomic_write_json(opts.output, {
        "format": opts.format, "checkpoint": str(opts.checkpoint), "tp": opts.tp, "pp": opts.pp,
        "backend": backend, "weight_dtype": info["dtype"], "compute_dtype": info["compute_dtype"],
        "int8_mode": info.get("int8_mode", 0), "prompts": prompts, "max_new_tokens": opts.max_new_tokens,
        "tokens": [r["tokens"] for r in results], "logits_file": logits_path.name,
        "prefill_s": [r["prefill_s"] for r in results], "decode_s": [r["decode_s"] for r in results],
        "wall_s": wall_s,
    })


if __name__ == "__main__":
    sys.exit(main())
