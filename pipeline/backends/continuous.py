"""Continuous (in-flight) batching over the project's Llama module: the serving engine of `torch-compiled`.

The KV cache is static: `max_num_seqs` rows (slots) of `max_seq_len` positions. A request takes the lowest
free slot when it is admitted and gives it back the moment its last token is out, so a new request joins at
the very next iteration (Orca / vLLM iteration-level scheduling).

Each `step()` is one iteration, prefill first (as vLLM's default scheduler before chunked prefill):
- if requests wait and slots are free, admit them in arrival order, up to `max_num_batched_tokens` prompt
  tokens (counting the padding), and prefill them in one call: prompts right-padded to the longest one, causal
  attention on this call's keys (padding only follows a prompt's real tokens, so it never reaches them), each
  row's K/V written into its own slot, the first token read at each prompt's last real position;
- otherwise one decode step for every running sequence, each at its own position ([b, 1] positions). The step
  runs over slots 0..B-1, B the smallest configured bucket holding the highest busy slot (free slots in
  between compute a throw-away row), and is the compiled step of pipeline/model/fused.py: one CUDA graph per
  bucket, one compiled graph for all buckets of 2 or more rows plus one for a single row.

Chunked prefill (splitting a long prompt across iterations, mixed into decode batches) is not built: with the
prompt lengths of the targets (128-2048) a whole prompt fits the token budget."""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.backends.requests import EngineLimits, Emitted, Request, RequestEngine


def default_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Powers of two below max_num_seqs, and max_num_seqs itself."""
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return (*buckets, max_num_seqs)


@dataclass
class _Sequence:
    request: Request
    position: int   # where the next token's K/V goes (= tokens held so far)
    token: int      # last token produced (the next decode step's input)
    produced: int


class ContinuousBatchEngine(RequestEngine):
    def __init__(self, model, step, limits: EngineLimits):
        """model: a loaded pipeline.model.llama.Llama (whole model); step: its fused.DecodeStep."""
        self.model, self.decode_step, self.limits = model, step, limits
        self.device = next(model.parameters()).device
        n = limits.max_num_seqs
        self.buckets = tuple(sorted(set(limits.slot_buckets or default_buckets(n))))
        if self.buckets[-1] != n:
            self.buckets = (*[b for b in self.buckets if b < n], n)
        model.setup_cache(n, limits.max_seq_len)
        self.free = list(range(n))  # a heap: the lowest free slot first keeps busy slots (and buckets) low
        self.running: dict[int, _Sequence] = {}
        self.waiting: deque[Request] = deque()
        self.prefills = self.decodes = 0

    # -- RequestEngine --------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def slots_in_use(self) -> int:
        return len(self.running)

    @torch.inference_mode()
    def step(self, timeout_s: Optional[float] = None) -> list[Emitted]:
        if self.waiting and self.free:
            return self._prefill()
        if self.running:
            return self._decode()
        return []

    @torch.inference_mode()
    def warm_up(self) -> dict[str, float]:
        """Run (compile, capture) the decode step of every bucket once; the rows it writes are free slots'."""
        seconds = {}
        for b in self.buckets:
            t0 = time.perf_counter()
            for _ in range(3):  # compile + side-stream warm-up + capture, then two replays (fused.WARM_UP_CALLS)
                self._run_decode(torch.zeros(b, dtype=torch.int64), torch.zeros(b, 1, dtype=torch.int64))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[f"decode_bs{b}"] = round(time.perf_counter() - t0, 3)
        return seconds

    def describe(self) -> dict[str, Any]:
        return {"batching": "continuous", "max_num_seqs": self.limits.max_num_seqs,
                "max_seq_len": self.limits.max_seq_len, "max_num_batched_tokens": self.limits.max_num_batched_tokens,
                "slot_buckets": list(self.buckets), "scheduler": "prefill-first, whole prompts (no chunked prefill)",
                "prefill": "eager, right-padded batch", "decode_step": self.decode_step.kind,
                "kv_cache_bytes": sum(t.numel() * t.element_size() for blk in self.model.model.layers.values()
                                      for t in (blk.self_attn.k_cache, blk.self_attn.v_cache))}

    def counts(self) -> dict[str, int]:
        return {"prefill_iterations": self.prefills, "decode_iterations": self.decodes}

    # -- iterations -----------------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        longest = 0
        while self.waiting and len(batch) < len(self.free):
            length = max(longest, len(self.waiting[0].prompt))
            if batch and length * (len(batch) + 1) > self.limits.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            longest = length
        return batch

    def _prefill(self) -> list[Emitted]:
        batch = self._admit()
        slots = [heapq.heappop(self.free) for _ in batch]
        longest = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.int64)
        for row, r in enumerate(batch):
            ids[row, :len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.int64)
        last = torch.tensor([len(r.prompt) - 1 for r in batch], dtype=torch.int64)
        logits = self.model(ids.to(self.device), torch.arange(longest, device=self.device), new_sequence=True,
                            slots=torch.tensor(slots, device=self.device), last_index=last.to(self.device))
        tokens = logits[:, -1].argmax(dim=-1).tolist()
        self.prefills += 1
        out = []
        for slot, r, token in zip(slots, batch, tokens):
            self.running[slot] = _Sequence(r, len(r.prompt), token, 1)
            out.append(self._emit(slot))
        return out

    def _run_decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> list[int]:
        x = tokens.to(self.device, non_blocking=True)[:, None]
        return self.decode_step(x, positions.to(self.device, non_blocking=True)).tolist()

    def _decode(self) -> list[Emitted]:
        highest = max(self.running) + 1
        b = next(k for k in self.buckets if k >= highest)
        # Plain lists then one tensor each: per-element writes into a tensor cost microseconds apiece, which at
        # hundreds of sequences per step would be a visible share of a ~10 ms step.
        tokens, positions = [0] * b, [0] * b
        for slot, seq in self.running.items():
            tokens[slot], positions[slot] = seq.token, seq.position
        next_tokens = self._run_decode(torch.tensor(tokens), torch.tensor(positions)[:, None])
        self.decodes += 1
        out = []
        for slot in list(self.running):
            seq = self.running[slot]
            seq.token, seq.position, seq.produced = next_tokens[slot], seq.position + 1, seq.produced + 1
            out.append(self._emit(slot))
        return out

    def _emit(self, slot: int) -> Emitted:
        seq = self.running[slot]
        finished = seq.produced >= seq.request.max_new_tokens
        if finished:  # the slot is free for the very next iteration
            del self.running[slot]
            heapq.heappush(self.free, slot)
        return Emitted(seq.request.id, seq.token, finished)
