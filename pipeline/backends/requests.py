"""The request-level interface the serving benchmark drives, and its adapter for prefill/decode backends.

An engine is driven the way vLLM's `LLMEngine` (add_request / step / has_unfinished_requests) and TensorRT-LLM's
executor (enqueue / await responses) are: the benchmark adds each request when it arrives and calls `step()`
in a loop; every call runs one iteration of the engine's own scheduler and returns the tokens it produced. The
benchmark stamps those tokens with the time `step()` returned (they are on the host then, as a streaming
client would receive them). So an engine with its own scheduler (TensorRT-LLM's `LLM` API, vLLM, SGLang) fits
as a backend by implementing these four methods; the benchmark, its load generator and its metrics do not
change.

`StaticBatchEngine` runs any `Backend` (prefill + decode of a static batch) under this interface: waiting
requests of one prompt length form a batch of up to `max_num_seqs`, which runs until its longest request is
done; requests arriving meanwhile wait. That is static batching, the baseline continuous batching is measured
against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Request:
    id: int
    prompt: tuple[int, ...]   # token ids
    max_new_tokens: int       # generated exactly (greedy, EOS ignored, as the benchmarks of the field do)


@dataclass(frozen=True)
class Emitted:
    request_id: int
    token: int
    finished: bool
    # time.perf_counter() when the token reached this process, for engines producing tokens in threads of their
    # own (TensorRT-LLM); None = when step() returned it, the time the benchmark stamps otherwise.
    at: Optional[float] = None


@dataclass(frozen=True)
class EngineLimits:
    """What the benchmark sizes an engine with (serving.max_num_seqs, ...; pipeline/config.py ServingConfig)."""

    max_num_seqs: int            # sequences in flight at once (KV-cache slots)
    max_seq_len: int             # prompt + output positions of the longest request
    max_num_batched_tokens: int  # prompt tokens one prefill iteration may take (padding included)
    slot_buckets: tuple[int, ...] = ()  # decode batch sizes compiled (continuous engines); () = powers of two


class RequestEngine(ABC):
    """One backend's serving engine. Not thread-safe: the benchmark drives it from one loop."""

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Queue a request; it joins at the engine's next iteration it has room in."""

    @abstractmethod
    def step(self, timeout_s: Optional[float] = None) -> list[Emitted]:
        """One iteration (a prefill, a decode step, or both); the tokens it produced, on the host. An engine
        running its iterations in threads of its own returns what arrived, waiting at most `timeout_s` (the
        time to the next arrival, so a request due meanwhile is added on time); one that computes in step()
        itself runs its iteration whatever `timeout_s` says."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Whether a queued or running request is left."""

    def warm_up(self) -> dict[str, float]:
        """Compile and capture whatever the timed run will need, outside any timing -> {what: seconds}."""
        return {}

    @property
    @abstractmethod
    def slots_in_use(self) -> int:
        """Sequences holding KV-cache room now (the benchmark samples it after every step)."""

    def describe(self) -> dict[str, Any]:
        return {}


class StaticBatchEngine(RequestEngine):
    def __init__(self, backend, limits: EngineLimits):
        self.backend, self.limits = backend, limits
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []
        self.tokens: torch.Tensor | None = None
        self.produced = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.batch)

    @property
    def slots_in_use(self) -> int:
        return len(self.batch)

    def _next_batch(self) -> list[Request]:
        # A static batch needs one prompt length: the oldest request's, and any waiting request sharing it.
        length = len(self.waiting[0].prompt)
        batch = [r for r in self.waiting if len(r.prompt) == length][:self.limits.max_num_seqs]
        taken = {r.id for r in batch}
        self.waiting = deque(r for r in self.waiting if r.id not in taken)
        return batch

    def step(self, timeout_s: Optional[float] = None) -> list[Emitted]:
        if not self.batch:
            if not self.waiting:
                return []
            self.batch = self._next_batch()
            longest = max(r.max_new_tokens for r in self.batch)
            self.backend.prepare(len(self.batch), len(self.batch[0].prompt) + longest)
            ids = torch.tensor([r.prompt for r in self.batch], dtype=torch.int64, device=self.backend.device)
            self.tokens = self.backend.prefill(ids)
            self.produced = 1
        else:
            self.tokens = self.backend.decode(self.tokens)
            self.produced += 1
        values = self.tokens.tolist()
        out = [Emitted(r.id, t, self.produced == r.max_new_tokens)
               for r, t in zip(self.batch, values) if self.produced <= r.max_new_tokens]
        if self.produced >= max(r.max_new_tokens for r in self.batch):
            self.batch, self.tokens = [], None  # the whole batch's room frees at once
        return out

    def describe(self) -> dict[str, Any]:
        return {"batching": "static", "max_num_seqs": self.limits.max_num_seqs}


def check_fits(request: Request, limits: EngineLimits, context: int) -> None:
    """A request the engine could never hold is a configuration error, said before anything runs."""
    need = len(request.prompt) + request.max_new_tokens
    if need > context:
        raise PipelineError(f"request {request.id}: {len(request.prompt)} prompt + {request.max_new_tokens} output "
                            f"tokens exceed the model's context of {context} positions; shorten serving.input_len / "
                            f"serving.output_len or the dataset's prompts")
    if len(request.prompt) > limits.max_num_batched_tokens:
        raise PipelineError(f"request {request.id}: its {len(request.prompt)}-token prompt exceeds "
                            f"serving.max_num_batched_tokens={limits.max_num_batched_tokens}; raise it")
