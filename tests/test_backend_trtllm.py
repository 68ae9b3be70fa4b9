"""Backends tensorrt-llm and tensorrt-llm-engine: the LLM's arguments as data, the request engine over a fake
`tensorrt_llm` (tests/fake_tensorrt_llm.py) driven by the serve stage's own loop, failures as one-line errors,
which LLM class each backend builds on which directory; and, marked trtllm, the real PyTorch flow against
Hugging Face greedy generation."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import defaultdict

import pytest
import torch

from pipeline.backends.base import BackendInputs
from pipeline.backends.registry import load_backend_class
from pipeline.backends.requests import EngineLimits, Request, RequestEngine
from pipeline.backends.trtllm import (TrtllmBackend, TrtllmEngineBackend, TrtllmRequestEngine, config_objects,
                                      llm_kwargs)
from pipeline.benchmark.serving import run_point
from pipeline.benchmark.workload import LoadPoint
from pipeline.config import TrtllmConfig
from pipeline.errors import PipelineError
from tests import fake_tensorrt_llm as fake

LIMITS = EngineLimits(max_num_seqs=4, max_seq_len=64, max_num_batched_tokens=512)


def _options(**changes) -> dict:
    return {**dataclasses.asdict(TrtllmConfig()), **changes}


# -- llm_kwargs -------------------------------------------------------------------------------------------------

def test_pytorch_flow_kwargs_map_parallelism_cap_at_limits_and_configure_cache_and_graphs():
    kwargs = llm_kwargs(_options(free_gpu_memory_fraction=0.85), EngineLimits(8, 300, 1024), tp=2, pp=4,
                        engine_flow=False, dtype="bfloat16")
    assert kwargs == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 4, "trust_remote_code": False,
        "skip_tokenizer_init": True, "dtype": "bfloat16", "max_seq_len": 300,
        "max_batch_size": 8,       # trtllm.max_batch_size 256 capped at serving.max_num_seqs
        "max_num_tokens": 1024,    # trtllm.max_num_tokens 8192 capped at serving.max_num_batched_tokens
        "kv_cache_config": {"free_gpu_memory_fraction": 0.85, "enable_block_reuse": False},
        "cuda_graph_config": {"enable_padding": True, "max_batch_size": 8},
    }
    smaller = llm_kwargs(_options(max_batch_size=3, max_num_tokens=100, cuda_graph_max_batch_size=2),
                         EngineLimits(8, 300, 1024), tp=1, pp=1, engine_flow=False)
    assert (smaller["max_batch_size"], smaller["max_num_tokens"]) == (3, 100)
    assert smaller["cuda_graph_config"] == {"enable_padding": True, "max_batch_size": 2}
    # Off is an explicit None: the PyTorch flow captures CUDA graphs unless told not to.
    assert llm_kwargs(_options(cuda_graphs=False), LIMITS, 1, 1, engine_flow=False)["cuda_graph_config"] is None


def test_engine_flow_kwargs_have_no_graph_or_build_time_settings_and_stay_within_the_engine():
    build = {"max_batch_size": 16, "max_num_tokens": 256, "max_seq_len": 128}
    kwargs = llm_kwargs(_options(build=build), EngineLimits(32, 100, 512), tp=2, pp=2, engine_flow=True)
    assert kwargs == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 2, "trust_remote_code": False,
        "skip_tokenizer_init": True, "max_batch_size": 16, "max_num_tokens": 256,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": False},
    }
    with pytest.raises(PipelineError, match=r"trtllm\.build\.max_seq_len=128: .*200 .*build_trtllm_engine"):
        llm_kwargs(_options(build=build), EngineLimits(32, 200, 512), tp=1, pp=1, engine_flow=True)


def test_missing_option_is_named():
    options = _options()
    del options["enable_block_reuse"]
    with pytest.raises(PipelineError, match=r"^trtllm\.enable_block_reuse: missing"):
        llm_kwargs(options, LIMITS, 1, 1, engine_flow=False)


def test_config_objects_build_the_library_classes():
    kwargs = llm_kwargs(_options(), LIMITS, 1, 1, engine_flow=False)
    objects = config_objects(kwargs, fake)
    assert objects["kv_cache_config"] == fake.KvCacheConfig(free_gpu_memory_fraction=0.9, enable_block_reuse=False)
    assert objects["cuda_graph_config"] == fake.CudaGraphConfig(enable_padding=True, max_batch_size=4)
    assert {k: v for k, v in objects.items() if not k.endswith("_config")} == \
        {k: v for k, v in kwargs.items() if not k.endswith("_config")}
    assert config_objects(llm_kwargs(_options(cuda_graphs=False), LIMITS, 1, 1, False), fake)["cuda_graph_config"] \
        is None


# -- the request engine over the fake library -------------------------------------------------------------------

@pytest.fixture
def weights_dir(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.fixture
def engine_dir(tmp_path):
    d = tmp_path / "trtllm_engine"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 3, "max_num_tokens": 300,
                                                                "max_seq_len": 80}}))
    for rank in range(2):
        (d / f"rank{rank}.engine").write_bytes(b"")
    return d


def _backend(cls, artifact, tp=1, pp=1, **options):
    name = "tensorrt-llm-engine" if cls is TrtllmEngineBackend else "tensorrt-llm"
    return cls(BackendInputs(name, artifact, "bf16", "cuda", tp=tp, pp=pp, options=_options(**options)))


def _engine(backend, limits: EngineLimits = LIMITS) -> TrtllmRequestEngine:
    backend.load()
    engine = backend.request_engine(limits)
    engine.timeout_s = 10.0   # a test that loses a token fails in seconds, not after the production 600 s
    return engine


class Recorder(RequestEngine):
    """Passes the serve loop's calls on, keeping every emitted token and finished flag per request."""

    def __init__(self, engine: TrtllmRequestEngine):
        self.engine = engine
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.flags: dict[int, list[bool]] = defaultdict(list)

    def add_request(self, request):
        self.engine.add_request(request)

    def step(self, timeout_s=None):
        emitted = self.engine.step(timeout_s)
        for e in emitted:
            self.tokens[e.request_id].append(e.token)
            self.flags[e.request_id].append(e.finished)
        assert 0 <= self.engine.slots_in_use <= self.engine.max_batch_size
        return emitted

    def has_unfinished_requests(self):
        return self.engine.has_unfinished_requests()

    @property
    def slots_in_use(self):
        return self.engine.slots_in_use


def _requests(n: int = 12) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    return [Request(i, tuple(torch.randint(2, 400, (int(torch.randint(1, 20, (1,), generator=g)),),
                                           generator=g).tolist()), 1 + i % 9) for i in range(n)]


@pytest.mark.parametrize("point", [LoadPoint("rate", 150.0), LoadPoint("concurrency", 3), LoadPoint("rate", math.inf)],
                         ids=lambda p: p.key)
def test_serve_loop_gets_every_token_once_in_order_with_one_finish_per_request(monkeypatch, weights_dir, point):
    fake.install(monkeypatch)
    backend = _backend(TrtllmBackend, weights_dir)
    engine = _engine(backend)
    requests = _requests()
    try:
        for _ in range(2):  # a second run reuses every request id, as the serve stage's load points do
            recorder = Recorder(engine)
            run = run_point(recorder, requests, point, burstiness=1.0, seed=3)
            for r in requests:
                assert recorder.tokens[r.id] == [fake.expected_token(r.prompt, k) for k in range(r.max_new_tokens)]
                assert recorder.flags[r.id] == [False] * (r.max_new_tokens - 1) + [True]
            assert [len(rec.token_s) for rec in run.records] == [r.max_new_tokens for r in requests]
            # Each token's time is when the stream thread received it (Emitted.at), in order within a request.
            assert all(rec.send_s <= rec.token_s[0] and rec.token_s == sorted(rec.token_s) for rec in run.records)
            assert not engine.has_unfinished_requests() and engine.slots_in_use == 0 and engine.step() == []
    finally:
        backend.close()
    llm = fake.TorchLLM.created[-1]
    assert [prompt for prompt, _ in llm.submitted] == [list(r.prompt) for r in requests] * 2
    params = {(tuple(prompt), p.max_tokens, p.ignore_eos, p.detokenize, p.end_id, p.top_k, p.top_p, p.temperature)
              for prompt, p in llm.submitted}
    assert params == {(r.prompt, r.max_new_tokens, True, False, -1, None, None, None) for r in requests}


def test_slots_in_use_counts_unfinished_requests_up_to_the_batch_size(monkeypatch, weights_dir):
    fake.install(monkeypatch)
    backend = _backend(TrtllmBackend, weights_dir)
    engine = _engine(backend, EngineLimits(max_num_seqs=2, max_seq_len=64, max_num_batched_tokens=512))
    try:
        engine.add_request(Request(0, (5, 6), 3))
        assert engine.slots_in_use == 1 and engine.has_unfinished_requests()
        for i in range(1, 4):
            engine.add_request(Request(i, (5, 6, i), 3))
        assert engine.slots_in_use == 2   # max_batch_size: the other two wait in TensorRT-LLM's queue
        with pytest.raises(PipelineError, match=r"request 0 was added while still in flight$"):
            engine.add_request(Request(0, (5, 6), 3))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.slots_in_use == 0
    finally:
        backend.close()


def test_warm_up_runs_requests_and_reports_the_llm_construction(monkeypatch, weights_dir):
    fake.install(monkeypatch)
    backend = _backend(TrtllmBackend, weights_dir)
    engine = _engine(backend)
    try:
        seconds = engine.warm_up()
        assert set(seconds) == {"llm_init", "warm_up_requests"} and seconds["warm_up_requests"] > 0
        assert len(fake.TorchLLM.created[-1].submitted) == 2 and not engine.has_unfinished_requests()
        described = engine.describe()
        assert described["batching"] == "in-flight (TensorRT-LLM)" and described["tensorrt_llm"] == fake.VERSION
        assert described["llm_kwargs"] == llm_kwargs(_options(), LIMITS, 1, 1, engine_flow=False, dtype="bfloat16")
    finally:
        backend.close()


@pytest.mark.parametrize("marker, expected", [
    (fake.FAIL_TOKEN, r"request 7 failed in TensorRT-LLM: RequestError: Request failed: CUDA error: an illegal "
                      r"memory access was encountered$"),
    (fake.SHORT_TOKEN, r"request 7 failed in TensorRT-LLM: RuntimeError: finished after 7 of 8 tokens$"),
])
def test_failed_request_is_a_one_line_error_from_step(monkeypatch, weights_dir, marker, expected):
    fake.install(monkeypatch)
    backend = _backend(TrtllmBackend, weights_dir)
    engine = _engine(backend)
    try:
        engine.add_request(Request(6, (3, 4), 5))
        engine.add_request(Request(7, (3, marker, 4), 8))
        with pytest.raises(PipelineError) as info:
            for _ in range(200):
                engine.step()
        assert "\n" not in str(info.value)
        assert str(info.value).startswith("backend tensorrt-llm: ")
        assert info.match(expected)
    finally:
        backend.close()


def test_no_token_for_too_long_is_an_error_naming_the_backend():
    engine = TrtllmRequestEngine(fake.TorchLLM("model"), fake.SamplingParams, "tensorrt-llm", LIMITS,
                                 {"max_batch_size": 4}, timeout_s=0.2)
    try:
        engine.add_request(Request(0, (fake.STALL_TOKEN,), 3))
        with pytest.raises(PipelineError, match=r"^backend tensorrt-llm: no token from TensorRT-LLM for 0\.2 s with "
                                                r"1 requests in flight"):
            engine.step()
    finally:
        engine.stop()


def test_step_returns_when_the_next_request_is_due_and_stamps_arrival_times():
    """With a timeout (the time to the next arrival) step() returns empty instead of waiting for a token, and the
    stall error still comes once nothing arrived for timeout_s; tokens carry the time they arrived."""
    import time

    engine = TrtllmRequestEngine(fake.TorchLLM("model"), fake.SamplingParams, "tensorrt-llm", LIMITS,
                                 {"max_batch_size": 4}, timeout_s=0.5)
    try:
        engine.add_request(Request(0, (fake.STALL_TOKEN,), 3))
        t0 = time.perf_counter()
        assert engine.step(0.05) == [] and time.perf_counter() - t0 < 0.4
        engine.add_request(Request(1, (5, 6), 4))
        got = []
        while len(got) < 4:
            before = time.perf_counter()
            got += [e for e in engine.step(0.05) if e.request_id == 1]
            assert all(e.at is not None and e.at <= time.perf_counter() for e in got)
        assert [e.token for e in got] == [fake.expected_token((5, 6), k) for k in range(4)]
        assert got[-1].at >= got[0].at and before  # arrival times, in order
        with pytest.raises(PipelineError, match="no token from TensorRT-LLM for 0.5 s"):
            while True:
                engine.step(0.05)
    finally:
        engine.stop()


# -- the two backends ---------------------------------------------------------------------------------------------

def test_registry_names_load_these_classes():
    assert load_backend_class("tensorrt-llm") is TrtllmBackend
    assert load_backend_class("tensorrt-llm-engine") is TrtllmEngineBackend


def test_pytorch_flow_builds_the_llm_on_the_weights_and_close_shuts_it_down(monkeypatch, weights_dir):
    fake.install(monkeypatch)
    backend = _backend(TrtllmBackend, weights_dir, tp=2, pp=1)
    engine = _engine(backend)
    llm = fake.TorchLLM.created[-1]
    assert type(llm) is fake.TorchLLM and llm.model == str(weights_dir.resolve())
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["pipeline_parallel_size"] == 1
    assert isinstance(llm.kwargs["cuda_graph_config"], fake.CudaGraphConfig)
    assert backend.layout() == (2, 1) and backend.describe()["tensorrt_llm_flow"] == "pytorch"
    backend.close()
    assert llm.is_shut_down and not engine._thread.is_alive() and backend.llm is None


def test_engine_flow_builds_the_engine_llm_on_the_engine_dir_within_its_build_sizes(monkeypatch, engine_dir):
    fake.install(monkeypatch)
    backend = _backend(TrtllmEngineBackend, engine_dir, tp=2, pp=1)
    engine = _engine(backend)
    llm = fake.TorchLLM.created[-1]
    assert type(llm) is fake.EngineLLM and llm.model == str(engine_dir.resolve())
    assert "cuda_graph_config" not in llm.kwargs and "max_seq_len" not in llm.kwargs
    assert llm.kwargs["max_batch_size"] == 3 and llm.kwargs["max_num_tokens"] == 300  # the engine's config.json
    try:
        engine.warm_up()   # requests run through the engine LLM too
        assert len(llm.submitted) == 2
    finally:
        backend.close()
    assert llm.is_shut_down
    with pytest.raises(PipelineError, match=r"trtllm\.build\.max_seq_len=80: .*100 "):
        backend.request_engine(EngineLimits(4, 100, 512))


def test_engine_flow_names_a_missing_rank_engine(monkeypatch, engine_dir):
    fake.install(monkeypatch)
    (engine_dir / "rank1.engine").unlink()
    with pytest.raises(PipelineError, match=r"rank1\.engine: not found; run dvc repro build_trtllm_engine$"):
        _backend(TrtllmEngineBackend, engine_dir, tp=2).load()


def test_benchmark_steps_are_refused_in_one_line(weights_dir):
    backend = _backend(TrtllmBackend, weights_dir)
    for call in (lambda: backend.prefill(torch.zeros(1, 4, dtype=torch.int64)),
                 lambda: backend.decode(torch.zeros(1, dtype=torch.int64))):
        with pytest.raises(PipelineError, match=r"^backend tensorrt-llm schedules requests itself; serve it "
                                                r"\(serving\.backends\)"):
            call()


def test_without_the_library_load_says_how_to_install_it(monkeypatch, weights_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)   # import tensorrt_llm raises ImportError
    with pytest.raises(PipelineError, match=r"cannot import TensorRT-LLM .*pip install -e '\.\[trtllm\]'"):
        _backend(TrtllmBackend, weights_dir).load()


# -- the real library ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_library():
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (pip install -e '.[trtllm]')")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT-LLM needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_model_dir(real_library, tmp_path_factory, default_cfg):
    """The tiny preset with a head size TensorRT-LLM's attention kernels take (64; the tiny model's is 8), trained
    as the tiny model is so that greedy tokens do not hang on near-ties."""
    from pipeline import weights

    model = dataclasses.replace(default_cfg.model, hidden_size=256, num_heads=4, num_kv_heads=2,
                                intermediate_size=512)
    out = tmp_path_factory.mktemp("trtllm") / "weights"
    weights.build(model, out)
    return out


@pytest.mark.trtllm
def test_pytorch_flow_generates_hugging_face_greedy_tokens(gpu_model_dir):
    from pipeline.model.hf import load_hf_model, load_tokenizer

    tokenizer = load_tokenizer(gpu_model_dir)
    texts = ["The quick brown fox", "Once upon a time there was", "In the beginning", "A model of language"]
    new = 12
    requests = [Request(i, tuple(tokenizer.encode(t)), new) for i, t in enumerate(texts)]
    limits = EngineLimits(max_num_seqs=4, max_seq_len=max(len(r.prompt) for r in requests) + new,
                          max_num_batched_tokens=256)
    backend = TrtllmBackend(BackendInputs("tensorrt-llm", gpu_model_dir, "fp16", "cuda",
                                          options=dataclasses.asdict(TrtllmConfig())))
    backend.load()
    try:
        engine = backend.request_engine(limits)
        engine.warm_up()
        recorder = Recorder(engine)
        run_point(recorder, requests, LoadPoint("rate", math.inf), burstiness=1.0, seed=0)
    finally:
        backend.close()
    hf = load_hf_model(gpu_model_dir, dtype=torch.float16).to("cuda")
    for r in requests:
        prompt = torch.tensor([r.prompt], device="cuda")
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert recorder.tokens[r.id] == expected[0, len(r.prompt):].tolist(), f"request {r.id}"
