"""TensorRT-LLM's `LLM` API as serving backends: `tensorrt-llm` (the PyTorch flow of TensorRT-LLM 1.x, on the
Hugging Face weights) and `tensorrt-llm-engine` (engines from trtllm-build, TensorRT-LLM <= 1.2).

Written against tensorrt_llm 1.0-1.2; never run here (no GPU, no NVIDIA package index). Names used, as read in
NVIDIA/TensorRT-LLM:
  tensorrt_llm/__init__.py, llmapi/llm.py     LLM (= _TorchLLM, the PyTorch flow), LLM.generate_async(inputs,
                                              sampling_params=, streaming=), LLM.shutdown()
  tensorrt_llm/_tensorrt_engine/__init__.py   LLM (= llmapi.llm._TrtLLM, the engine flow)
  tensorrt_llm/llmapi/llm_args.py             tensor_parallel_size, pipeline_parallel_size, dtype, max_batch_size,
                                              max_num_tokens, max_seq_len, skip_tokenizer_init, trust_remote_code,
                                              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction,
                                              enable_block_reuse), cuda_graph_config=CudaGraphConfig(enable_padding,
                                              max_batch_size) (TorchLlmArgs only; None turns CUDA graphs off)
  tensorrt_llm/sampling_params.py             SamplingParams(max_tokens, ignore_eos, end_id, pad_id, detokenize);
                                              top_k, top_p and temperature left unset = greedy
  tensorrt_llm/executor/result.py             GenerationResult: `async for` over a streaming result,
                                              .outputs[0].token_ids (all tokens so far), .finished

How a request runs: add_request() hands it to one asyncio loop in a background thread, which calls
generate_async(streaming=True) at once (TensorRT-LLM batches in flight in its own executor) and iterates the
result, queueing each new chunk of tokens with the time it arrived. step() waits for the first chunk (at most
until the next request is due), drains the queue and returns one Emitted per token, stamped with that arrival
time (Emitted.at), so a token's time does not depend on when the driving loop took it from the queue."""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.backends.base import Backend
from pipeline.backends.requests import Emitted, EngineLimits, Request, RequestEngine
from pipeline.errors import PipelineError
from pipeline.precision import PRECISIONS
from pipeline.requirements import PACKAGES

# No token from the library for this long, with requests in flight, means a hung or dead worker.
STEP_TIMEOUT_S = 600.0
OPTION_KEYS = ("free_gpu_memory_fraction", "enable_block_reuse", "max_batch_size", "max_num_tokens", "cuda_graphs",
               "cuda_graph_max_batch_size", "build")
ENGINE_BUILD_KEYS = ("max_batch_size", "max_num_tokens", "max_seq_len")


def llm_kwargs(options: Mapping[str, Any], limits: EngineLimits, tp: int, pp: int, engine_flow: bool,
               dtype: str = "auto") -> dict[str, Any]:
    """The LLM's keyword arguments as plain data, from the `trtllm` params section and the serve stage's limits.
    Nested configs are dicts here; config_objects() makes them the library's classes."""
    missing = [k for k in OPTION_KEYS if k not in options]
    if missing:
        raise PipelineError(f"trtllm.{missing[0]}: missing from the options handed to the TensorRT-LLM backend; "
                            f"recompose params.yaml (dvc exp run) so it has the whole trtllm section")
    max_batch_size = min(options["max_batch_size"], limits.max_num_seqs)
    max_num_tokens = min(options["max_num_tokens"], limits.max_num_batched_tokens)
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "trust_remote_code": False,
        "skip_tokenizer_init": True,  # requests are token ids and outputs are not detokenized
        "kv_cache_config": {"free_gpu_memory_fraction": options["free_gpu_memory_fraction"],
                            "enable_block_reuse": options["enable_block_reuse"]},
    }
    if engine_flow:
        build = options["build"]
        if limits.max_seq_len > build["max_seq_len"]:
            raise PipelineError(f"trtllm.build.max_seq_len={build['max_seq_len']}: the engine holds fewer positions "
                                f"than the {limits.max_seq_len} the serving requests need (prompt + output); raise "
                                f"it and rerun dvc repro build_trtllm_engine")
        # Sizes were fixed at build time: runtime values may only lower them (llm_args.py rejects larger ones) and
        # max_seq_len is no runtime setting of an engine.
        max_batch_size = min(max_batch_size, build["max_batch_size"])
        max_num_tokens = min(max_num_tokens, build["max_num_tokens"])
    else:
        kwargs["dtype"] = dtype
        kwargs["max_seq_len"] = limits.max_seq_len
        # CUDA graphs are on by default in the PyTorch flow; None is how TorchLlmArgs turns them off.
        kwargs["cuda_graph_config"] = ({"enable_padding": True,
                                        "max_batch_size": min(options["cuda_graph_max_batch_size"], max_batch_size)}
                                       if options["cuda_graphs"] else None)
    kwargs["max_batch_size"] = max_batch_size
    kwargs["max_num_tokens"] = max_num_tokens
    return kwargs


def config_objects(kwargs: Mapping[str, Any], llmapi) -> dict[str, Any]:
    """llm_kwargs() with its nested dicts made the config classes of `llmapi` (tensorrt_llm.llmapi)."""
    out = dict(kwargs)
    out["kv_cache_config"] = llmapi.KvCacheConfig(**kwargs["kv_cache_config"])
    if kwargs.get("cuda_graph_config") is not None:
        out["cuda_graph_config"] = llmapi.CudaGraphConfig(**kwargs["cuda_graph_config"])
    return out


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


@dataclass
class _Stream:
    request: Request
    produced: int = 0   # tokens handed out by step()


class TrtllmRequestEngine(RequestEngine):
    """The serve stage's engine over a constructed LLM. The main thread owns the bookkeeping; the loop thread
    only calls the LLM and fills the event queue."""

    def __init__(self, llm, sampling_params, name: str, limits: EngineLimits, kwargs: Mapping[str, Any], *,
                 version: str = "", init_s: float = 0.0, timeout_s: float = STEP_TIMEOUT_S):
        """llm: a constructed LLM; sampling_params: the library's SamplingParams class; kwargs: llm_kwargs()."""
        self.llm, self.sampling_params, self.name, self.limits = llm, sampling_params, name, limits
        self.kwargs, self.version, self.init_s, self.timeout_s = dict(kwargs), version, init_s, timeout_s
        self.max_batch_size = kwargs["max_batch_size"]
        # Keyed by a ticket per submission, not the request id: the benchmark reuses ids across load points.
        self._streams: dict[int, _Stream] = {}
        self._ids: set[int] = set()
        self._tickets = itertools.count()
        # (ticket, new tokens, error or None, time.perf_counter() when the stream thread received them)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._last_event = time.perf_counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-streams", daemon=True)
        self._thread.start()

    # -- RequestEngine --------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.id in self._ids:
            raise PipelineError(f"backend {self.name}: request {request.id} was added while still in flight")
        ticket = next(self._tickets)
        if not self._streams:
            self._last_event = time.perf_counter()  # the stall clock starts with the first request in flight
        self._streams[ticket] = _Stream(request)
        self._ids.add(request.id)
        asyncio.run_coroutine_threadsafe(self._stream(ticket, request), self._loop)

    def step(self, timeout_s: float | None = None) -> list[Emitted]:
        if not self._streams:
            return []
        try:
            events = [self._events.get(timeout=self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s))]
        except queue.Empty:
            if time.perf_counter() - self._last_event < self.timeout_s:
                return []  # a request is due: the benchmark adds it and calls again
            raise PipelineError(f"backend {self.name}: no token from TensorRT-LLM for {self.timeout_s:g} s with "
                                f"{len(self._streams)} requests in flight; see its log above (a hung or dead "
                                f"worker)") from None
        self._last_event = time.perf_counter()
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        emitted: list[Emitted] = []
        for ticket, tokens, error, at in events:
            stream = self._streams.get(ticket)
            if stream is None:
                continue  # a late event of a request already complete
            request = stream.request
            if error:
                raise PipelineError(f"backend {self.name}: request {request.id} failed in TensorRT-LLM: {error}")
            for token in tokens:
                stream.produced += 1
                emitted.append(Emitted(request.id, int(token), stream.produced == request.max_new_tokens, at))
            if stream.produced == request.max_new_tokens:
                del self._streams[ticket]
                self._ids.discard(request.id)
        return emitted

    def has_unfinished_requests(self) -> bool:
        return bool(self._streams)

    @property
    def slots_in_use(self) -> int:
        # Submitted and unfinished; TensorRT-LLM's scheduler runs at most max_batch_size of them, the rest wait
        # in its queue without KV-cache room.
        return min(len(self._streams), self.max_batch_size)

    def warm_up(self) -> dict[str, float]:
        """Two short requests end to end (the first requests pay for lazy setup in the workers), timed, next to
        the LLM's construction (weights, KV cache, CUDA graph capture or engine deserialization)."""
        new = max(1, min(4, self.limits.max_seq_len // 2))
        length = max(1, min(16, self.limits.max_seq_len - new, self.limits.max_num_batched_tokens))
        t0 = time.perf_counter()
        for i in range(2):  # negative ids: never a workload request's
            self.add_request(Request(-1 - i, tuple(range(1, length + 1)), new))
        while self.has_unfinished_requests():
            self.step()
        return {"llm_init": round(self.init_s, 3), "warm_up_requests": round(time.perf_counter() - t0, 3)}

    def describe(self) -> dict[str, Any]:
        return {"batching": "in-flight (TensorRT-LLM)", "tensorrt_llm": self.version,
                "max_num_seqs": self.limits.max_num_seqs, "max_seq_len": self.limits.max_seq_len,
                "max_num_batched_tokens": self.limits.max_num_batched_tokens, "llm_kwargs": self.kwargs,
                "scheduler": "TensorRT-LLM's own; each request is submitted when it arrives",
                "token_times": "when the stream thread received them from TensorRT-LLM (Emitted.at)"}

    # -- the stream thread ----------------------------------------------------------------------------------

    async def _stream(self, ticket: int, request: Request) -> None:
        # Runs in the loop thread. generate_async is called here, inside the running loop: a result created
        # without one has no asyncio queue and cannot be iterated with `async for` (executor/result.py).
        try:
            params = self.sampling_params(max_tokens=request.max_new_tokens, ignore_eos=True, detokenize=False,
                                          end_id=-1, pad_id=-1)  # no EOS and no tokenizer needed (as trtllm-bench)
            result = self.llm.generate_async(list(request.prompt), sampling_params=params, streaming=True)
            seen = 0
            async for output in result:
                # Counted here rather than read from token_ids_diff, whose bookkeeping differs between versions.
                tokens = output.outputs[0].token_ids
                if len(tokens) > request.max_new_tokens:
                    raise RuntimeError(f"{len(tokens)} tokens returned, {request.max_new_tokens} asked for")
                if len(tokens) > seen:
                    self._events.put((ticket, list(tokens[seen:]), None, time.perf_counter()))
                    seen = len(tokens)
            if seen < request.max_new_tokens:
                raise RuntimeError(f"finished after {seen} of {request.max_new_tokens} tokens")
        except Exception as e:  # a failed request ends the run, from step(), in the driving thread
            self._events.put((ticket, [], _one_line(e), time.perf_counter()))

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:
        """End the stream thread; requests still in flight are abandoned."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


class _TrtllmBackend(Backend):
    """What both flows share. The LLM is constructed in request_engine(), not load(): its batch and sequence
    sizes come from the serve stage's limits, which arrive only there (the serve stage calls the two back to
    back, and warm_up() reports the construction time as `llm_init`)."""

    flow: str                      # recorded in describe()
    engine_flow: bool
    requirement: str               # pipeline/requirements.py PACKAGES key (its install hint)

    def __init__(self, inputs):
        super().__init__(inputs)
        self.llm = None
        self.engine: TrtllmRequestEngine | None = None
        self._llm_class = self._llmapi = None
        self._version = ""

    @abstractmethod
    def import_llm_class(self):
        """The flow's LLM class (imports tensorrt_llm)."""

    @abstractmethod
    def check_artifact(self) -> None:
        """A one-line error if the directory handed in is not what this flow loads."""

    def load(self) -> None:
        try:
            import tensorrt_llm
            import tensorrt_llm.llmapi as llmapi  # KvCacheConfig, CudaGraphConfig, SamplingParams

            self._llm_class = self.import_llm_class()
        except Exception as e:  # not installed, or a wheel that does not match the CUDA/torch here
            package = PACKAGES[self.requirement]
            raise PipelineError(f"backend {self.name}: cannot import TensorRT-LLM ({_one_line(e)}); "
                                f"{package.install_hint()} ({package.reason})") from None
        self._llmapi, self._version = llmapi, str(getattr(tensorrt_llm, "__version__", "unknown"))
        self.check_artifact()

    def options(self) -> dict[str, Any]:
        return dict(self.inputs.options)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise PipelineError(self._no_steps())

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise PipelineError(self._no_steps())

    def _no_steps(self) -> str:
        return (f"backend {self.name} schedules requests itself; serve it (serving.backends), the benchmark stage "
                f"cannot time its prefill/decode")

    def request_engine(self, limits: EngineLimits) -> TrtllmRequestEngine:
        if self._llm_class is None:
            self.load()
        self.close()  # a second engine replaces the first LLM
        dtype = PRECISIONS[self.precision].long_name  # "float16" / "bfloat16": the LLM's dtype names
        kwargs = llm_kwargs(self.options(), limits, self.inputs.tp, self.inputs.pp, self.engine_flow, dtype)
        t0 = time.perf_counter()
        try:
            self.llm = self._llm_class(str(self.artifact.resolve()), **config_objects(kwargs, self._llmapi))
        except Exception as e:
            raise PipelineError(f"backend {self.name}: TensorRT-LLM could not set up {self.artifact}: "
                                f"{_one_line(e)}") from e
        self.engine = TrtllmRequestEngine(self.llm, self._llmapi.SamplingParams, self.name, limits, kwargs,
                                          version=self._version, init_s=time.perf_counter() - t0)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def layout(self) -> tuple[int, int]:
        return self.inputs.tp, self.inputs.pp

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "tensorrt_llm_flow": self.flow}


def _require_file(path: Path, stage: str) -> None:
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run dvc repro {stage}")


class TrtllmBackend(_TrtllmBackend):
    """`from tensorrt_llm import LLM`: the PyTorch flow, loading the Hugging Face weights directory."""

    flow, engine_flow, requirement = "pytorch", False, "tensorrt_llm"

    def import_llm_class(self):
        from tensorrt_llm import LLM

        return LLM

    def check_artifact(self) -> None:
        _require_file(self.artifact / "config.json", "weights")
        if not any(self.artifact.glob("*.safetensors")):
            raise PipelineError(f"{self.artifact}: no *.safetensors; run dvc repro weights")


class TrtllmEngineBackend(_TrtllmBackend):
    """`from tensorrt_llm._tensorrt_engine import LLM`: engines from trtllm-build (config.json + rank{r}.engine)."""

    flow, engine_flow, requirement = "tensorrt engine", True, "tensorrt_llm_engine"

    def import_llm_class(self):
        from tensorrt_llm._tensorrt_engine import LLM  # removed after TensorRT-LLM 1.2

        return LLM

    def check_artifact(self) -> None:
        _require_file(self.artifact / "config.json", "build_trtllm_engine")
        for rank in range(self.inputs.tp * self.inputs.pp):
            _require_file(self.artifact / f"rank{rank}.engine", "build_trtllm_engine")

    def options(self) -> dict[str, Any]:
        """The params section, with the sizes the engine was really built with (its config.json) as `build`."""
        path = self.artifact / "config.json"
        try:
            built = json.loads(path.read_text())["build_config"]
            sizes = {k: int(built[k]) for k in ENGINE_BUILD_KEYS}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: no readable build_config ({_one_line(e)}); rerun dvc repro "
                                f"build_trtllm_engine") from None
        options = dict(self.inputs.options)
        options["build"] = {**options.get("build", {}), **sizes}
        return options
