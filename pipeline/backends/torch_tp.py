"""Backend `torch-tp`: the project's TP x PP runner on the TensorRT-LLM checkpoint (artifacts/trtllm).

Runs SPMD under torchrun: every rank executes the same benchmark loop; the runner's calls to prefill /
decode drive one pass through all pipeline stages, and the greedy tokens are broadcast from the last
stage so every rank feeds the same ids. Rank 0 times and writes the results. NCCL on GPUs (one per
rank); on CPU it runs over gloo, which proves correctness but is not a performance number."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.backends.base import Backend
from pipeline.errors import PipelineError
from pipeline.paths import TRTLLM_DIR


class TorchTPBackend(Backend):
    name = "torch-tp"
    distributed = True

    def load(self) -> None:
        import torch.distributed as dist

        from pipeline import artifacts
        from pipeline.parallel.mapping import Mapping
        from pipeline.parallel.pp import Stage
        from pipeline.parallel.run import load_stage
        from pipeline.parallel.tp import apply_tp, new_tp_group

        if "RANK" not in os.environ:
            raise PipelineError("backend torch-tp runs under torchrun; the benchmark stage launches it")
        ckpt = Path(os.environ.get("PIPELINE_TP_CHECKPOINT", TRTLLM_DIR))
        manifest = artifacts.verify_manifest(ckpt)
        if manifest.get("skipped"):
            raise PipelineError(f"{ckpt}: {manifest['reason']}; backend torch-tp needs the TensorRT-LLM checkpoint")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        self.mapping = Mapping(manifest["tp"], manifest["pp"], rank=dist.get_rank(), world_size=dist.get_world_size())
        dtype = self.precision.name if self.precision.name in ("fp32", "fp16", "bf16") else None
        model, _ = load_stage("trtllm", ckpt, self.mapping, self.device, dtype)
        apply_tp(model, new_tp_group(self.mapping), self.mapping.tp)
        self.stage = Stage(model, self.mapping, self.device)
        self.pos = 0

    @property
    def is_reporting_rank(self) -> bool:
        return self.mapping.rank == 0

    def prepare(self, batch_size: int, max_seq_len: int) -> None:
        self.stage.model.setup_cache(batch_size, max_seq_len)

    def _next_tokens(self, logits: torch.Tensor | None, batch: int) -> torch.Tensor:
        import torch.distributed as dist

        tokens = torch.zeros(batch, dtype=torch.int64, device=self.device)
        if logits is not None:
            tokens.copy_(logits[:, -1].argmax(dim=-1))
        if self.mapping.world_size > 1:
            dist.broadcast(tokens, src=self.mapping.rank_of(0, self.mapping.pp - 1))
        return tokens

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        logits = self.stage.forward(input_ids.to(self.device), torch.arange(length, device=self.device))
        self.pos = length
        return self._next_tokens(logits, batch)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.tensor([self.pos], device=self.device)
        logits = self.stage.forward(tokens[:, None], pos)
        self.pos += 1
        return self._next_tokens(logits, tokens.shape[0])

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "tp": str(self.mapping.tp), "pp": str(self.mapping.pp),
                "memory_scope": "rank 0"}
