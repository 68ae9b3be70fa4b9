"""The TP x PP layout of one process: a validated value object (after TensorRT-LLM's Mapping, cp_size=1).

Ranks are laid out TP-fastest, rank = pp_rank * tp + tp_rank, in both TensorRT-LLM (mapping.py) and
FasterTransformer (MPI cart {pp, tp}); so TP groups are neighbouring ranks (GPUs on one NVLink island):
    tp=2, pp=2:  rank0=(tp0,pp0) rank1=(tp1,pp0) rank2=(tp0,pp1) rank3=(tp1,pp1)
TP group of rank r: the tp ranks of its stage. PP peers: the same tp_rank in the stages before/after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Mapping:
    tp: int = 1
    pp: int = 1
    rank: int = 0
    world_size: int = field(default=0)  # 0 = tp * pp

    def __post_init__(self) -> None:
        for key in ("tp", "pp"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PipelineError(f"parallel.{key} must be an integer >= 1; got {value!r}")
        if self.world_size == 0:
            object.__setattr__(self, "world_size", self.tp * self.pp)
        if self.world_size != self.tp * self.pp:
            raise PipelineError(f"world_size={self.world_size} must equal parallel.tp * parallel.pp = "
                                f"{self.tp}*{self.pp}; launch torchrun with --nproc-per-node={self.tp * self.pp}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise PipelineError(f"rank must be in [0, {self.world_size}); got {self.rank!r}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def rank_of(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    @property
    def tp_group(self) -> list[int]:
        return [self.rank_of(t, self.pp_rank) for t in range(self.tp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> int:
        """The rank this one receives activations from (same tp_rank, previous stage)."""
        if self.is_first_stage:
            raise PipelineError(f"rank {self.rank} is on the first pipeline stage and has no previous stage")
        return self.rank_of(self.tp_rank, self.pp_rank - 1)

    @property
    def next_rank(self) -> int:
        if self.is_last_stage:
            raise PipelineError(f"rank {self.rank} is on the last pipeline stage and has no next stage")
        return self.rank_of(self.tp_rank, self.pp_rank + 1)

    def layers(self, num_layers: int, *, even: bool = False) -> range:
        """Global layer indices of this stage: torch.tensor_split order, so with num_layers % pp != 0 the
        first stages get one extra (TensorRT-LLM pp_layers). even=True (FasterTransformer) requires
        num_layers % pp == 0."""
        if self.pp > num_layers:
            raise PipelineError(f"parallel.pp={self.pp} exceeds num_hidden_layers={num_layers}")
        if even and num_layers % self.pp:
            raise PipelineError(f"parallel.pp={self.pp} must divide num_hidden_layers={num_layers} "
                                f"(FasterTransformer splits layers evenly)")
        base, extra = divmod(num_layers, self.pp)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))

    def all_ranks(self) -> Iterator["Mapping"]:
        for r in range(self.world_size):
            yield Mapping(self.tp, self.pp, r)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "tp_size": self.tp, "pp_size": self.pp}
