"""A stand-in `tensorrt_llm` package for tests, installed into sys.modules by install(monkeypatch).

It mimics the parts of TensorRT-LLM 1.x that pipeline/backends/trtllm.py uses, as they behave in the library:
- `tensorrt_llm.LLM` (PyTorch flow) and `tensorrt_llm._tensorrt_engine.LLM` (engine flow) take the model path and
  keyword arguments, reject names their LlmArgs do not have (cuda_graph_config is PyTorch-flow only) and want
  config objects, not dicts;
- `generate_async(..., streaming=True)` returns a result at once and produces its tokens from a background thread
  in chunks of 1-3 with small sleeps; the result is an async iterator whose `.outputs[0].token_ids` holds every
  token so far and whose `.finished` turns true with the last response (sometimes an empty one, as the library's
  final response can be);
- as in executor/result.py, only a result created inside a running event loop can be iterated with `async for`;
- a request whose prompt holds FAIL_TOKEN fails after its first chunk: iterating it raises RequestError
  (STALL_TOKEN and SHORT_TOKEN make a request that never answers, or one that ends a token early).

Token k of a request is expected_token(prompt, k): deterministic, so tests can check every token."""

from __future__ import annotations

import asyncio
import itertools
import queue
import random
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Optional

VOCAB = 512
FAIL_TOKEN = 499    # in a prompt: the request fails after its first chunk
STALL_TOKEN = 498   # in a prompt: no response ever comes
SHORT_TOKEN = 497   # in a prompt: the request finishes one token short of max_tokens
VERSION = "1.2.0+fake"


def expected_token(prompt, k: int) -> int:
    return (sum(prompt) + k) % VOCAB


@dataclass(kw_only=True)
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    ignore_eos: bool = False
    detokenize: bool = True
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None


@dataclass(kw_only=True)
class KvCacheConfig:
    free_gpu_memory_fraction: Optional[float] = None
    enable_block_reuse: bool = True


@dataclass(kw_only=True)
class CudaGraphConfig:
    batch_sizes: Optional[list] = None
    max_batch_size: int = 0
    enable_padding: bool = False


class RequestError(RuntimeError):
    """Raised while iterating a request the executor failed (executor/utils.py)."""


@dataclass
class CompletionOutput:
    index: int
    token_ids: list = field(default_factory=list)


class GenerationResult:
    def __init__(self, request_id: int, prompt: list):
        self.request_id, self.prompt_token_ids = request_id, prompt
        self.outputs = [CompletionOutput(0)]
        self._done = False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.aqueue = asyncio.Queue() if self._loop else None
        self.queue = queue.Queue()

    @property
    def finished(self) -> bool:
        return self._done

    def _put(self, response) -> bool:
        """Called from the producer thread, as the executor's response thread does; False once the consumer's
        loop is gone (a test that ended with requests in flight)."""
        if self._loop is None:
            self.queue.put(response)
            return True
        try:
            self._loop.call_soon_threadsafe(self.aqueue.put_nowait, response)
        except RuntimeError:
            return False
        return True

    def _handle(self, response) -> None:
        tokens, final, error = response
        if error:
            raise RequestError(error)
        self.outputs[0].token_ids.extend(tokens)
        self._done = final

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        if self.aqueue is None:
            raise AssertionError("The asyncio event loop was not present during initialization, so async "
                                 "operations are not available.")
        self._handle(await self.aqueue.get())
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        self._handle(self.queue.get())
        return self


# Keyword arguments each flow's LlmArgs accepts (of those the backend may pass).
COMMON_ARGS = {"tokenizer", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size",
               "pipeline_parallel_size", "dtype", "kv_cache_config", "max_batch_size", "max_num_tokens", "max_seq_len"}


class _LLM:
    accepted = COMMON_ARGS
    created: list["_LLM"] = []   # every LLM made since install(), oldest first

    def __init__(self, model, **kwargs):
        bad = sorted(set(kwargs) - self.accepted)
        if bad:
            raise ValueError(f"{type(self).__name__} got invalid argument: {bad[0]}")
        if not isinstance(kwargs.get("kv_cache_config", KvCacheConfig()), KvCacheConfig):
            raise TypeError("kv_cache_config must be a KvCacheConfig")
        if kwargs.get("cuda_graph_config") is not None and not isinstance(kwargs["cuda_graph_config"],
                                                                          CudaGraphConfig):
            raise TypeError("cuda_graph_config must be a CudaGraphConfig or None")
        self.model, self.kwargs = model, kwargs
        self.is_shut_down = False
        self.submitted: list[tuple[list, SamplingParams]] = []
        self._ids = itertools.count()
        _LLM.created.append(self)

    def generate_async(self, inputs, sampling_params=None, streaming=False, **_):
        if self.is_shut_down:
            raise RuntimeError("LLM is shutting down")
        params = sampling_params or SamplingParams()
        if params.end_id is None and self.kwargs.get("skip_tokenizer_init"):
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly specify "
                             "the end_id for sampling_params")
        prompt = list(inputs)
        self.submitted.append((prompt, params))
        result = GenerationResult(next(self._ids), prompt)
        threading.Thread(target=self._produce, args=(result, prompt, params.max_tokens), daemon=True).start()
        return result

    def _produce(self, result: GenerationResult, prompt: list, n: int) -> None:
        if STALL_TOKEN in prompt:
            return
        if SHORT_TOKEN in prompt:
            n -= 1
        rng = random.Random(sum(prompt))
        empty_final = rng.random() < 0.5   # the last tokens, then an empty final response
        k = 0
        while k < n:
            time.sleep(rng.uniform(0.0, 0.004))
            if FAIL_TOKEN in prompt and k > 0:
                result._put(([], True, "Request failed: CUDA error: an illegal memory access was encountered\n"
                                       "(traceback follows)"))
                return
            chunk = min(rng.randint(1, 3), n - k)
            tokens = [expected_token(prompt, k + i) for i in range(chunk)]
            k += chunk
            if not result._put((tokens, k == n and not empty_final, None)):
                return
        if empty_final:
            result._put(([], True, None))

    def shutdown(self) -> None:
        self.is_shut_down = True


class TorchLLM(_LLM):
    """tensorrt_llm.LLM: llmapi.llm._TorchLLM."""

    accepted = COMMON_ARGS | {"cuda_graph_config"}


class EngineLLM(_LLM):
    """tensorrt_llm._tensorrt_engine.LLM: llmapi.llm._TrtLLM."""


def install(monkeypatch) -> types.ModuleType:
    """Put the fake package into sys.modules for one test; returns the top module."""
    _LLM.created = []
    root = types.ModuleType("tensorrt_llm")
    root.__path__ = []   # a package, so its submodules import
    root.__version__ = VERSION
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    root.LLM = llmapi.LLM = TorchLLM
    root.SamplingParams = llmapi.SamplingParams = SamplingParams
    llmapi.KvCacheConfig, llmapi.CudaGraphConfig, llmapi.RequestError = KvCacheConfig, CudaGraphConfig, RequestError
    engine.LLM = EngineLLM
    root.llmapi, root._tensorrt_engine = llmapi, engine
    for module in (root, llmapi, engine):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return root
