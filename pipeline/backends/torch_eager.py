"""Backend `torch`: Hugging Face LlamaForCausalLM in eager mode with a dynamic KV cache, greedy.

This is also the reference implementation every faster backend is compared with."""

from __future__ import annotations

import inspect

import torch

from pipeline.backends.base import Backend
from pipeline.errors import PipelineError
from pipeline.precision import torch_dtype


class TorchEagerBackend(Backend):
    def load(self) -> None:
        from transformers import LlamaForCausalLM

        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError("hardware.device=cuda but torch sees no CUDA device; use hardware=cpu")
        self.model = LlamaForCausalLM.from_pretrained(
            str(self.artifact), dtype=torch_dtype(self.precision), use_safetensors=True, trust_remote_code=False
        ).to(self.device).eval()
        self.cache = None
        # transformers renamed the forward's `past_key_values` to `cache` (5.2x); an older release silently
        # swallows `cache=` in **kwargs and decodes with no KV cache at all, so pass whichever it declares.
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids.to(self.device), **{self.cache_kwarg: self.cache}, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].argmax(dim=-1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], **{self.cache_kwarg: self.cache}, use_cache=True)
        return out.logits[:, -1].argmax(dim=-1)
