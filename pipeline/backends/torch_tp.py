"""Backend `torch-tp`: the project's TP x PP runner on the TensorRT-LLM checkpoint (artifacts/trtllm).

Runs SPMD under torchrun: every rank executes the same benchmark loop; the runner's calls to prefill /
decode drive one pass through all pipeline stages, and the greedy tokens are broadcast from the last
stage so every rank feeds the same ids. Rank 0 times and writes the results. NCCL on GPUs (one per
rank); on CPU it runs over gloo, which proves correctness but is not a performance number.

Each rank runs the same model as torch-compiled (fused wqkv/w13, static KV cache) with its TP collectives as
functional collectives, so each rank's decode step compiles with them: on CUDA into one CUDA graph
(benchmark.compile=auto), on CPU/gloo only when asked (inductor; eager is the default there). prepare()
compiles it for the scenario's shape on every rank, timed apart from the runs and reported as compile_s.
The point-to-point sends between pipeline stages and the token broadcast stay outside the graph."""

from __future__ import annotations

from typing import Any, Optional

import torch

from pipeline.backends.base import Backend
from pipeline.errors import PipelineError


class TorchTPBackend(Backend):
    def load(self) -> None:
        import torch.distributed as dist

        from pipeline import artifacts
        from pipeline.backends.torch_compiled import INDUCTOR_CACHE_DIR
        from pipeline.convert.load import load_stage
        from pipeline.model.fused import DecodeStep, compile_enabled
        from pipeline.parallel import launch
        from pipeline.parallel.mapping import Mapping
        from pipeline.parallel.pp import Stage
        from pipeline.parallel.tp import apply_tp, new_tp_group

        manifest = artifacts.read_manifest(self.artifact)  # verified by the benchmark stage before launch
        if manifest.get("skipped"):
            raise PipelineError(f"{self.artifact}: {manifest['reason']}; backend torch-tp needs the TensorRT-LLM "
                                f"checkpoint")
        compiled = compile_enabled(self.inputs.compile, self.device)
        self.device = launch.init_rank(self.device.type, "backend torch-tp runs under torchrun; the benchmark "
                                                         "stage launches it")
        self.mapping = Mapping(manifest["tp"], manifest["pp"], rank=dist.get_rank(), world_size=dist.get_world_size())
        model, _ = load_stage("trtllm", self.artifact, self.mapping, self.device, self.precision)
        apply_tp(model, new_tp_group(self.mapping), self.mapping.tp)
        self.stage = Stage(model, self.mapping, self.device)
        self.step = DecodeStep(model, compiled, INDUCTOR_CACHE_DIR)
        self.input_pos = torch.zeros(1, dtype=torch.int64, device=self.device)

    @property
    def is_reporting_rank(self) -> bool:
        return self.mapping.rank == 0

    def layout(self) -> tuple[int, int]:
        return self.mapping.tp, self.mapping.pp

    @torch.inference_mode()
    def prepare(self, batch_size: int, max_seq_len: int) -> None:
        self.stage.model.setup_cache(batch_size, max_seq_len)
        # Every rank warms up together (the step holds collectives), with inputs made as decode() makes them
        # (inference tensors: dynamo guards on that, and would recompile at the first timed decode otherwise).
        # Writes cache position 0, which prefill overwrites.
        self.input_pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        tokens = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.step.warm_up(lambda: self._decode_pass(tokens))

    def _shared(self, tokens: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """The last stage's tokens [batch] (None elsewhere), broadcast so every rank feeds the same ids."""
        import torch.distributed as dist

        out = torch.zeros(batch, dtype=torch.int64, device=self.device)
        if tokens is not None:
            out.copy_(tokens)
        if self.mapping.world_size > 1:
            dist.broadcast(out, src=self.mapping.rank_of(0, self.mapping.pp - 1))
        return out

    def _decode_pass(self, tokens: torch.Tensor) -> torch.Tensor:
        next_tokens = self.stage.forward(tokens[:, None], self.input_pos, step=self.step)
        return self._shared(next_tokens, tokens.shape[0])

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        positions = torch.arange(length, device=self.device)
        logits = self.stage.forward(input_ids.to(self.device), positions, new_sequence=True, last_only=True)
        self.input_pos = positions[-1:] + 1
        return self._shared(None if logits is None else logits[:, -1].argmax(dim=-1), batch)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        next_tokens = self._decode_pass(tokens)
        self.input_pos += 1
        return next_tokens

    def close(self) -> None:
        from pipeline.parallel import launch

        launch.shutdown()

    def describe(self) -> dict[str, Any]:
        # compile_s: rank 0's warm-ups (every rank compiles its own step at the same time).
        return {**super().describe(), "memory_scope": "rank 0", "decode_step": self.step.kind,
                "compile_s": round(sum(self.step.compile_s.values()), 3),
                "compile_s_by_shape": dict(self.step.compile_s)}
