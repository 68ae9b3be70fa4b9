"""The one start-up path for distributed ranks: the torchrun command line that launches them, and what a rank
does first (its device, its process group). The verify runner and the torch-tp benchmark backend both use it."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

from pipeline.errors import PipelineError


def torchrun_command(nproc: int, module: str, args: Sequence[str], *, nnodes: int = 1,
                     rdzv_endpoint: Optional[str] = None, rdzv_id: str = "llama3-pipeline") -> list[str]:
    """`python -m torch.distributed.run` for nproc ranks on this node, each running `python -m module args`.

    nnodes > 1: this node's share of a multi-node job. Every node runs the same command; torchrun's c10d
    rendezvous at rdzv_endpoint (host:port on one of the nodes, reachable from all) assigns node ranks, and global
    rank = node rank * nproc + local rank. Mapping puts rank = pp_rank * tp + tp_rank, so with nproc = tp each
    tensor-parallel group stays inside one node (NVLink) and only pipeline sends cross the network."""
    if nnodes == 1:
        where = ["--standalone"]
    elif not rdzv_endpoint:
        raise PipelineError(f"nnodes={nnodes} needs a rendezvous endpoint (host:port of one node, reachable from all)")
    else:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            "--monitor-interval=0.1", "-m", module, *args]


def process_group_backend(device: str) -> str:
    """NCCL between GPUs (one per rank), gloo on CPU (proves correctness, not a performance number)."""
    return "nccl" if device == "cuda" else "gloo"


def init_rank(device: str, who: str) -> torch.device:
    """Join the process group torchrun set up; returns this rank's device (cuda:LOCAL_RANK or cpu).
    `who` names the entry point in the error raised when the process was not started by torchrun."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PipelineError(f"no torch.distributed environment: {who}")
    rank_device = torch.device("cpu")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PipelineError(f"rank {os.environ['RANK']} needs GPU {local}, torch sees "
                                f"{torch.cuda.device_count()}; use fewer ranks (parallel.tp x parallel.pp) or hardware=cpu")
        rank_device = torch.device("cuda", local)
        torch.cuda.set_device(rank_device)
    backend = process_group_backend(device)
    dist.init_process_group(backend, device_id=rank_device if backend == "nccl" else None)
    return rank_device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
