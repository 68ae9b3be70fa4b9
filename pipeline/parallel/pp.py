"""Pipeline parallelism: one stage per PP rank, activations passed with send/recv, greedy generation.

Stage p (ranks p*tp .. p*tp+tp-1) runs its layer range. Each TP rank sends its (replicated) hidden states
[b, s, H] to the same tp_rank of stage p+1. The last stage's TP rank 0 picks the next token and broadcasts
it to every rank, so the first stage can embed it for the next step. Prefill and each decode step are one
pass through all stages (no micro-batching: this runner checks correctness, it is not a scheduler)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError
from pipeline.model.llama import Llama
from pipeline.parallel.mapping import Mapping


class Stage:
    def __init__(self, model: Llama, mapping: Mapping, device: torch.device):
        self.model, self.mapping, self.device = model, mapping, device
        self.dtype = model.dtype

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *,
                step: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                **model_kwargs) -> Optional[torch.Tensor]:
        """tokens [b, s] (known to every rank). Returns full logits [b, s, V] on the last stage, else None.

        step: run this rank's part as step(x, input_pos) instead of the model (a compiled decode step,
        pipeline/model/fused.py); on the last stage the result is then whatever step returns (next tokens).
        model_kwargs go to Llama.forward (new_sequence, last_only)."""
        m = self.mapping
        x = tokens
        if not m.is_first_stage:
            x = torch.empty(*tokens.shape, self.model.args.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=m.prev_rank)
        y = step(x, input_pos) if step is not None else self.model(x, input_pos, **model_kwargs)
        if m.is_last_stage:
            return y
        dist.send(y.contiguous(), dst=m.next_rank)
        return None

    def _next_token(self, logits: Optional[torch.Tensor]) -> int:
        token = torch.zeros(1, dtype=torch.int64, device=self.device)
        if logits is not None:
            token[0] = logits[0, -1].argmax()
        if self.mapping.world_size > 1:
            dist.broadcast(token, src=self.mapping.rank_of(0, self.mapping.pp - 1))
        return int(token.item())

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int) -> dict:
        """Greedy decoding with the static KV cache; never stops early (EOS is just another token).
        Returns {"logits": [s, V] float32 on the last stage else None, "tokens", "prefill_s", "decode_s"}."""
        if not prompt or max_new_tokens < 1:
            raise PipelineError("each prompt needs >= 1 token and max_new_tokens must be >= 1")
        self.model.setup_cache(1, len(prompt) + max_new_tokens)
        ids = torch.tensor([prompt], dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        logits = self.forward(ids, torch.arange(len(prompt), device=self.device), new_sequence=True)
        tokens = [self._next_token(logits)]
        prefill_s = time.perf_counter() - t0
        prompt_logits = None if logits is None else logits[0].float()
        decode = []
        for step in range(max_new_tokens - 1):
            t0 = time.perf_counter()
            pos = torch.tensor([len(prompt) + step], device=self.device)
            logits = self.forward(torch.tensor([[tokens[-1]]], device=self.device), pos)
            tokens.append(self._next_token(logits))
            decode.append(time.perf_counter() - t0)
        return {"logits": prompt_logits, "tokens": tokens, "prefill_s": prefill_s, "decode_s": decode}

    def logits_to_rank0(self, logits: Optional[torch.Tensor], seq_len: int) -> Optional[torch.Tensor]:
        """Rank 0 (first stage) writes the results; the logits live on the last stage's TP rank 0."""
        m = self.mapping
        src = m.rank_of(0, m.pp - 1)
        if src == 0:
            return logits if m.rank == 0 else None
        if m.rank == src:
            dist.send(logits.contiguous(), dst=0)
        elif m.rank == 0:
            buf = torch.empty(seq_len, self.model.args.vocab_size, dtype=torch.float32, device=self.device)
            dist.recv(buf, src=src)
            return buf
        return None
