"""Continuous batching (pipeline/backends/continuous.py) and static batching (requests.py StaticBatchEngine):
every request's greedy tokens equal those of its prompt run alone, whatever joins or leaves the batch around it;
and the Llama.forward paths they rest on (per-row positions, prefill into given cache rows)."""

from __future__ import annotations

import copy
from collections import defaultdict, deque

import pytest
import torch

from pipeline.backends.continuous import ContinuousBatchEngine, default_buckets
from pipeline.backends.requests import EngineLimits, Request, StaticBatchEngine
from pipeline.backends.torch_compiled import INDUCTOR_CACHE_DIR
from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.model.fused import DecodeStep
from pipeline.model.llama import Llama
from tests.helpers import make_backend

ARGS = LlamaArgs(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
MAX_SEQ_LEN = 24  # longest request: 12 prompt + 10 new


def _tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ARGS)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # large enough that greedy tokens vary from step to step
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Llama:
    return _tiny_llama()


@torch.inference_mode()
def _alone(model: Llama, prompt: tuple[int, ...], new: int) -> list[int]:
    """Greedy tokens of one prompt in a batch of its own: prefill, then one decode step per token."""
    model.setup_cache(1, len(prompt) + new)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)), new_sequence=True, last_only=True)
    token = logits[:, -1].argmax(dim=-1)
    out = [token.item()]
    for pos in range(len(prompt), len(prompt) + new - 1):
        token = model(token[:, None], torch.tensor([pos]))[:, -1].argmax(dim=-1)
        out.append(token.item())
    return out


def _requests(seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 12, 7, 5, 9, 4, 11, 6, 8, 10, 3, 12]
    new = [4, 1, 10, 6, 2, 8, 3, 7, 5, 9, 1, 6]
    return [Request(i, tuple(torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist()), k)
            for i, (n, k) in enumerate(zip(lengths, new))]


@pytest.fixture(scope="module")
def expected(model) -> dict[int, list[int]]:
    reference = copy.deepcopy(model)
    return {r.id: _alone(reference, r.prompt, r.max_new_tokens) for r in _requests()}


def _serve(engine, requests: list[Request]):
    """The first three requests at once, then one every other step -> (tokens, finished flags, prefill sizes)."""
    pending = deque(requests)
    for _ in range(3):
        engine.add_request(pending.popleft())
    tokens, finished, prefill_sizes = defaultdict(list), defaultdict(list), []
    i = 0
    while pending or engine.has_unfinished_requests():
        if pending and i % 2 == 0:
            engine.add_request(pending.popleft())
        prefills = engine.prefills
        emitted = engine.step()
        if engine.prefills > prefills:
            prefill_sizes.append(len(emitted))
        for e in emitted:
            tokens[e.request_id].append(e.token)
            finished[e.request_id].append(e.finished)
        assert engine.slots_in_use <= engine.limits.max_num_seqs
        i += 1
        assert i < 500
    return tokens, finished, prefill_sizes


def _continuous(model, compiled: bool, cache_dir) -> ContinuousBatchEngine:
    # 24 prompt tokens per prefill (padding included): the first three requests (3, 12, 7 tokens) need
    # 3 x 12 = 36, so the prefill takes the first two and the third waits for the next one.
    limits = EngineLimits(max_num_seqs=4, max_seq_len=MAX_SEQ_LEN, max_num_batched_tokens=24)
    return ContinuousBatchEngine(model, DecodeStep(model, compiled, cache_dir, dynamic_batch=True), limits)


def _check_run(engine, expected):
    requests = _requests()
    tokens, finished, prefill_sizes = _serve(engine, requests)
    for r in requests:
        assert tokens[r.id] == expected[r.id], f"request {r.id}"
        # finished exactly once, on the last token
        assert finished[r.id] == [False] * (r.max_new_tokens - 1) + [True], f"request {r.id}"
    assert prefill_sizes[0] == 2 and max(prefill_sizes) >= 2  # a padded batch, split at the token budget
    assert sum(prefill_sizes) == len(requests)
    assert not engine.running and not engine.waiting and not engine.has_unfinished_requests()
    assert sorted(engine.free) == [0, 1, 2, 3] and engine.slots_in_use == 0
    assert engine.step() == []
    return engine


def test_default_buckets():
    assert default_buckets(1) == (1,)
    assert default_buckets(4) == (1, 2, 4)
    assert default_buckets(6) == (1, 2, 4, 6)


def test_continuous_batching_tokens_equal_each_request_alone(model, expected, tmp_path):
    engine = _check_run(_continuous(model, False, tmp_path), expected)
    assert engine.counts()["decode_iterations"] > 0 and engine.describe()["slot_buckets"] == [1, 2, 4]


def test_continuous_batching_compiled_decode_step_matches(expected, monkeypatch):
    from torch._dynamo.utils import counters

    # The backends' git-ignored inductor cache (a rerun loads instead of compiling); the step sets
    # TORCHINDUCTOR_CACHE_DIR for the process, monkeypatch restores it after the test.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR.resolve()))
    engine = _continuous(_tiny_llama(), True, INDUCTOR_CACHE_DIR)
    assert set(engine.warm_up()) == {"decode_bs1", "decode_bs2", "decode_bs4"}
    graphs = counters["stats"]["unique_graphs"]
    _check_run(engine, expected)
    # One graph for a single row, one for 2-4 rows, both made by warm_up: nothing compiles while serving.
    assert counters["stats"]["unique_graphs"] == graphs


def test_slots_are_reused_lowest_first(model, tmp_path):
    engine = _continuous(model, False, tmp_path)
    for r in _requests()[:5]:
        engine.add_request(Request(r.id, r.prompt[:4], 2 if r.id == 1 else 5))
    engine.step()  # prefill: 4 x 4 tokens fit, 4 slots; request 4 waits
    assert sorted(s.request.id for s in engine.running.values()) == [0, 1, 2, 3] and engine.free == []
    engine.step()  # decode: request 1 (slot 1) produces its 2nd and last token, its slot is free at once
    assert engine.free == [1] and engine.slots_in_use == 3
    engine.step()  # request 4 joins in slot 1
    assert engine.running[1].request.id == 4


# -- static batching over a real backend --------------------------------------------------------------------


def test_static_batches_hold_one_prompt_length_and_tokens_equal_each_request_alone(tiny_model_dir):
    backend = make_backend("torch-compiled", tiny_model_dir)
    backend.load()
    g = torch.Generator().manual_seed(1)
    shape = [(5, 3), (8, 2), (5, 6), (5, 1), (8, 4), (6, 3), (5, 2)]  # (prompt length, new tokens)
    requests = [Request(i, tuple(torch.randint(2, 512, (n,), generator=g).tolist()), k)
                for i, (n, k) in enumerate(shape)]
    expected = {}
    for r in requests:
        backend.prepare(1, len(r.prompt) + r.max_new_tokens)
        out = [backend.prefill(torch.tensor([r.prompt]))]
        for _ in range(r.max_new_tokens - 1):
            out.append(backend.decode(out[-1]))
        expected[r.id] = [t.item() for t in out]

    engine = StaticBatchEngine(backend, EngineLimits(max_num_seqs=2, max_seq_len=16, max_num_batched_tokens=64))
    for r in requests:
        engine.add_request(r)
    tokens, finished, batches = defaultdict(list), defaultdict(list), []
    while engine.has_unfinished_requests():
        was_running = bool(engine.batch)
        emitted = engine.step()
        if not was_running:
            batches.append([r.id for r in engine.batch] or [e.request_id for e in emitted])
        for e in emitted:
            tokens[e.request_id].append(e.token)
            finished[e.request_id].append(e.finished)
        assert len(engine.batch) <= 2
    assert tokens == expected
    for r in requests:
        assert finished[r.id] == [False] * (r.max_new_tokens - 1) + [True]
    # The oldest waiting request's length picks the batch; up to 2 of that length, in arrival order.
    assert batches == [[0, 2], [1, 4], [3, 6], [5]]
    assert engine.slots_in_use == 0 and engine.step() == []


# -- Llama.forward: per-row positions and prefill into given rows -------------------------------------------


@torch.inference_mode()
def test_per_row_positions_decode_equals_each_sequence_decoded_alone(model):
    batched, single = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (1, n), generator=g) for n in (5, 2, 8)]
    batched.setup_cache(3, 16)
    for slot, p in enumerate(prompts):
        batched(p, torch.arange(p.shape[1]), new_sequence=True, slots=torch.tensor([slot]))
    tokens = torch.tensor([[11], [42], [7]])
    got = batched(tokens, torch.tensor([[5], [2], [8]]))  # each row at its own length
    for row, p in enumerate(prompts):
        single.setup_cache(1, 16)
        single(p, torch.arange(p.shape[1]), new_sequence=True)
        want = single(tokens[row:row + 1], torch.tensor([p.shape[1]]))
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5)
        for a, b in zip(batched.model.layers.values(), single.model.layers.values()):
            n = p.shape[1] + 1
            torch.testing.assert_close(a.self_attn.k_cache[row, :, :n], b.self_attn.k_cache[0, :, :n])


@torch.inference_mode()
def test_per_row_decode_on_fewer_rows_than_the_cache_leaves_the_rest(model):
    m = copy.deepcopy(model)
    m.setup_cache(4, 16)
    m(torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(3)), torch.arange(6), new_sequence=True)
    before = [b.self_attn.k_cache.clone() for b in m.model.layers.values()]
    m(torch.tensor([[1], [2]]), torch.tensor([[6], [3]]))
    for b, old in zip(m.model.layers.values(), before):
        k = b.self_attn.k_cache
        assert torch.equal(k[2:], old[2:])
        assert not torch.equal(k[0, :, 6], old[0, :, 6]) and not torch.equal(k[1, :, 3], old[1, :, 3])
        assert torch.equal(k[0, :, :6], old[0, :, :6]) and torch.equal(k[1, :, 4:], old[1, :, 4:])


@torch.inference_mode()
def test_prefill_into_slots_writes_only_those_rows(model):
    m, alone = copy.deepcopy(model), copy.deepcopy(model)
    m.setup_cache(4, 16)
    g = torch.Generator().manual_seed(4)
    for b in m.model.layers.values():  # stale contents everywhere
        b.self_attn.k_cache.normal_(generator=g)
        b.self_attn.v_cache.normal_(generator=g)
    before = [(b.self_attn.k_cache.clone(), b.self_attn.v_cache.clone()) for b in m.model.layers.values()]
    ids = torch.randint(0, 97, (2, 5), generator=g)
    logits = m(ids, torch.arange(5), new_sequence=True, slots=torch.tensor([2, 0]), last_index=torch.tensor([4, 2]))
    assert logits.shape == (2, 1, 97)
    for b, (k_old, v_old) in zip(m.model.layers.values(), before):
        for cache, old in ((b.self_attn.k_cache, k_old), (b.self_attn.v_cache, v_old)):
            assert torch.equal(cache[[1, 3]], old[[1, 3]])      # rows not named: untouched
            assert torch.equal(cache[[0, 2], :, 5:], old[[0, 2], :, 5:])  # past the prompt: untouched
    alone.setup_cache(1, 16)
    for row, slot, last in ((0, 2, 4), (1, 0, 2)):
        want = alone(ids[row:row + 1], torch.arange(5), new_sequence=True)
        torch.testing.assert_close(logits[row, 0], want[0, last], rtol=1e-5, atol=1e-5)  # last_index picks
        for a, b in zip(m.model.layers.values(), alone.model.layers.values()):
            torch.testing.assert_close(a.self_attn.k_cache[slot, :, :5], b.self_attn.k_cache[0, :, :5])
            torch.testing.assert_close(a.self_attn.v_cache[slot, :, :5], b.self_attn.v_cache[0, :, :5])


def test_slots_need_a_prefill_and_rows_must_fit_the_cache(model):
    m = copy.deepcopy(model)
    m.setup_cache(2, 8)
    with pytest.raises(PipelineError, match="slots= is for a prefill") as info:
        m(torch.tensor([[1]]), torch.tensor([3]), slots=torch.tensor([0]))
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match="3 rows but the KV cache holds 2"):
        m(torch.ones(3, 1, dtype=torch.int64), torch.tensor([[1], [2], [3]]))


def test_compiled_per_row_decode_writes_the_cache_in_place(model):
    """The compiled dynamic-batch step must update K/V in the cache tensors, not in a copy of the rows it uses:
    inductor made such a copy (then wrote it back) when the write went through a [:b] view, every step, which
    halved the decode speed of the serving benchmark on an H200. Read from inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    m = copy.deepcopy(model)
    m.setup_cache(8, 48)
    step = DecodeStep(m, compiled=True, cache_dir=INDUCTOR_CACHE_DIR, dynamic_batch=True)
    x, pos = torch.zeros(4, 1, dtype=torch.int64), torch.zeros(4, 1, dtype=torch.int64)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(pos, 0)
    with torch.inference_mode():
        _, code = run_and_get_code(step.fn, x, pos)
    attn = next(iter(m.model.layers.values())).self_attn
    cache_tail = f"{attn.n_kv}, {m.max_seq_len}, {attn.head_dim})"
    copies = [line.strip() for line in "\n".join(code).splitlines() if "empty_strided" in line and cache_tail in line]
    assert not copies, f"the compiled step allocates cache-sized buffers: {copies}"
