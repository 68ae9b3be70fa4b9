"""The TP x PP layout of one process: a validated value object (after TensorRT-LLM's Mapping, cp_size=1).

Ranks are laid out TP-fastest, rank = pp_rank * tp + tp_rank, in both TensorRT-LLM (mapping.py) and
FasterTransformer (MPI cart {pp, tp}); so TP groups are neighbouring ranks (GPUs on one NVLink island):
    tp=2, pp=2:  rank0=(tp0,pp0) rank1=(tp1,pp0) rank2=(tp0,pp1) rank3=(tp1,pp1)
TP group of rank r: the tp ranks of its stage. PP peers: the same tp_rank in the stages before/after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class CheckpointFormat:
    """What a tensor x pipeline parallel checkpoint format allows."""

    title: str
    even_pp: bool        # layers split evenly (FasterTransformer: FT_CHECK(num_layer % pp == 0)); else the first
                         # num_layers % pp stages get one extra layer (TensorRT-LLM pp_layers)
    replicates_kv: bool  # tp > num_kv_heads repeats KV heads across ranks (TensorRT-LLM dup_kv_weight); the
                         # FasterTransformer GQA fork (PR #785) computes kv_head_num / tp and cannot


# The one table of checkpoint formats (convert.formats values).
CHECKPOINT_FORMATS = {
    "ft": CheckpointFormat("FasterTransformer", even_pp=True, replicates_kv=False),
    "trtllm": CheckpointFormat("TensorRT-LLM", even_pp=False, replicates_kv=True),
}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_layout(tp: int, pp: int, *, num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 num_layers: Optional[int] = None, intermediate_size: Optional[int] = None,
                 formats: Iterable[str] = ()) -> None:
    """The one check of a tp x pp layout against a model's shape and the checkpoint formats asked for.

    Config validation, both converters and the runner call it; shape values unknown yet (a hub model before
    download) are None and skipped. Errors name parallel.tp / parallel.pp and the allowed values."""
    for key, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineError(f"parallel.{key} must be an integer >= 1; got {value!r}")
    rules = []
    for fmt in formats:
        if fmt not in CHECKPOINT_FORMATS:
            raise PipelineError(f"convert.formats: unknown format {fmt!r} (allowed: {', '.join(CHECKPOINT_FORMATS)})")
        rules.append(CHECKPOINT_FORMATS[fmt])
    if num_heads is not None and num_heads % tp:
        raise PipelineError(f"parallel.tp must divide model.num_heads={num_heads}; got {tp} "
                            f"(allowed: {_divisors(num_heads)})")
    if num_kv_heads is not None and num_kv_heads % tp:
        strict = [r.title for r in rules if not r.replicates_kv]
        if strict:
            raise PipelineError(f"parallel.tp must divide model.num_kv_heads={num_kv_heads} for {strict[0]} (it "
                                f"cannot replicate KV heads); got {tp}: use a smaller tp or drop that format from "
                                f"convert.formats")
        if tp % num_kv_heads:
            raise PipelineError(f"parallel.tp must divide model.num_kv_heads={num_kv_heads} or be a multiple of it; "
                                f"got {tp}")
    if intermediate_size is not None and intermediate_size % tp:
        raise PipelineError(f"parallel.tp must divide model.intermediate_size={intermediate_size}; got {tp}")
    if num_layers is not None:
        if pp > num_layers:
            raise PipelineError(f"parallel.pp must be <= model.num_layers={num_layers}; got {pp}")
        even = [r.title for r in rules if r.even_pp]
        if even and num_layers % pp:
            raise PipelineError(f"parallel.pp must divide model.num_layers={num_layers} for {even[0]} (it splits "
                                f"layers evenly); got {pp} (allowed: {_divisors(num_layers)})")


@dataclass(frozen=True)
class Mapping:
    tp: int = 1
    pp: int = 1
    rank: int = 0
    world_size: int = field(default=0)  # 0 = tp * pp

    def __post_init__(self) -> None:
        check_layout(self.tp, self.pp)
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

    def layers(self, num_layers: int, fmt: Optional[str] = None) -> range:
        """Global layer indices of this stage: torch.tensor_split order, so with num_layers % pp != 0 the
        first stages get one extra (TensorRT-LLM pp_layers); a format with even_pp requires num_layers % pp == 0."""
        check_layout(self.tp, self.pp, num_layers=num_layers, formats=[fmt] if fmt else [])
        base, extra = divmod(num_layers, self.pp)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))

    def all_ranks(self) -> Iterator["Mapping"]:
        for r in range(self.world_size):
            yield Mapping(self.tp, self.pp, r)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "tp_size": self.tp, "pp_size": self.pp}
