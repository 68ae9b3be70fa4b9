"""Backend `torch-tp`: the project's TP x PP runner on the TensorRT-LLM checkpoint (artifacts/trtllm).

Runs SPMD under torchrun: every rank executes the same benchmark loop; the runner's calls to prefill /
decode drive one pass through all pipeline stages, and the greedy tokens are broadcast from the last
stage so every rank feeds the same ids. Rank 0 times and writes the results. NCCL on GPUs (one per
rank); on CPU it runs over gloo, which proves correctness but is not a performance number."""

from __future__ import annotations

import torch

from pipeline.backends.base import Backend
from pipeline.errors import PipelineError


class TorchTPBackend(Backend):
    def load(self) -> None:
        import torch.distributed as dist

        from pipeline import artifacts
        from pipeline.convert.load import load_stage
        from pipeline.parallel import launch
        from pipeline.parallel.mapping import Mapping
        from pipeline.parallel.pp import Stage
        from pipeline.parallel.tp import apply_tp, new_tp_group

        manifest = artifacts.read_manifest(self.artifact)  # verified by the benchmark stage before launch
        if manifest.get("skipped"):
            raise PipelineError(f"{self.artifact}: {manifest['reason']}; backend torch-tp needs the TensorRT-LLM "
                                f"checkpoint")
        self.device = launch.init_rank(self.device.type, "backend torch-tp runs under torchrun; the benchmark "
                                                         "stage launches it")
        self.mapping = Mapping(manifest["tp"], manifest["pp"], rank=dist.get_rank(), world_size=dist.get_world_size())
        model, _ = load_stage("trtllm", self.artifact, self.mapping, self.device, self.precision)
        apply_tp(model, new_tp_group(self.mapping), self.mapping.tp)
        self.stage = Stage(model, self.mapping, self.device)
        self.pos = 0

    @property
    def is_reporting_rank(self) -> bool:
        return self.mapping.rank == 0

    def layout(self) -> tuple[int, int]:
        return self.mapping.tp, self.mapping.pp

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
        from pipeline.parallel import launch

        launch.shutdown()

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "memory_scope": "rank 0"}
