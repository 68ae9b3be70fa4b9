"""Backend torch-compiled: the project's Llama (fused weights, static KV cache) generates the torch backend's and
Hugging Face generate's greedy tokens; the compiled decode step (inductor on CPU) generates the same; compile
time is reported in describe() and stays out of the timed generations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.backends.registry import BACKENDS
from pipeline.benchmark.runner import generate_timed
from pipeline.errors import ConfigError, PipelineError
from pipeline.precision import FLOAT_PRECISIONS, WEIGHT_QUANT_PRECISIONS
from tests.helpers import make_backend


def _backend(model_dir, compile: str = "eager", precision: str = "fp32", compile_prefill: bool = False):
    backend = make_backend("torch-compiled", model_dir, precision)
    backend.inputs = dataclasses.replace(backend.inputs, compile=compile, compile_prefill=compile_prefill)
    backend.load()
    return backend


def _generate(backend, prompt: torch.Tensor, new_tokens: int, prepare: bool = True) -> torch.Tensor:
    if prepare:
        backend.prepare(prompt.shape[0], prompt.shape[1] + new_tokens)
    tokens = [backend.prefill(prompt)]
    for _ in range(new_tokens - 1):
        tokens.append(backend.decode(tokens[-1]))
    return torch.stack(tokens, dim=1)


def _prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return _backend(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    backend = make_backend("torch", tiny_model_dir)
    backend.load()
    return backend


def test_registry_entry_runs_float_and_weight_quantized_precisions_on_hf_weights():
    spec = BACKENDS["torch-compiled"]
    assert spec.precisions == FLOAT_PRECISIONS + WEIGHT_QUANT_PRECISIONS and spec.devices == ("cpu", "cuda")
    assert spec.artifact_for("bf16") == "hf_weights" and not spec.distributed
    assert spec.cannot_run("int8", "cpu") is not None


# 120 + 16 = 136 positions: the generation fills the static cache to its last slot and crosses position 128,
# the tiny model's llama3 RoPE original_max_position_embeddings.
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_greedy_tokens_equal_torch_backend_and_hf_generate(eager, reference, batch):
    prompt, new = _prompt(batch, 120, seed=batch), 16
    ours = _generate(eager, prompt, new)
    assert eager.model.max_seq_len == 136
    theirs = [reference.prefill(prompt)]
    for _ in range(new - 1):
        theirs.append(reference.decode(theirs[-1]))
    assert torch.equal(ours, torch.stack(theirs, dim=1))
    expected = reference.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, expected[:, 120:])


def test_kv_cache_is_preallocated_per_scenario(eager):
    eager.prepare(3, 20)
    shapes = {(tuple(b.self_attn.k_cache.shape), tuple(b.self_attn.v_cache.shape))
              for b in eager.model.model.layers.values()}
    assert shapes == {((3, 2, 20, 8), (3, 2, 20, 8))}  # [batch, kv_heads, max_len, head_dim]
    eager.prepare(1, 64)
    assert eager.model.model.layers["0"].self_attn.k_cache.shape == (1, 2, 64, 8)


def test_second_prefill_starts_a_clean_sequence(tiny_model_dir, eager):
    """A longer request leaves keys in cache slots a shorter one never writes: they must not leak into it."""
    short = _prompt(2, 5, seed=7)
    fresh = _backend(tiny_model_dir)
    fresh.prepare(2, 24)
    want = _generate(fresh, short, 8, prepare=False)
    eager.prepare(2, 24)
    _generate(eager, _prompt(2, 16, seed=8), 8, prepare=False)
    assert torch.equal(_generate(eager, short, 8, prepare=False), want)
    written = 5 + 7
    for a, b in zip(eager.model.model.layers.values(), fresh.model.model.layers.values()):
        assert torch.equal(a.self_attn.k_cache[:, :, :written], b.self_attn.k_cache[:, :, :written])
    assert not torch.equal(eager.model.model.layers["0"].self_attn.k_cache, fresh.model.model.layers["0"].self_attn.k_cache)


def test_decoding_past_the_prepared_cache_fails_with_one_line(eager):
    eager.prepare(1, 6)
    token = eager.prefill(_prompt(1, 5))
    token = eager.decode(token)  # position 5, the last slot
    with pytest.raises(PipelineError, match=r"7 positions exceed the KV cache of 6 that prepare\(\) sized") as info:
        eager.decode(token)
    assert "\n" not in str(info.value)


def test_eager_on_cpu_by_default_and_nothing_to_report(tiny_model_dir):
    backend = _backend(tiny_model_dir, compile="auto")
    backend.prepare(1, 8)
    facts = backend.describe()
    assert facts["decode_step"] == "eager" and facts["compile_s"] == 0 and facts["compile_s_by_shape"] == {}


def test_compiled_decode_step_on_cpu_matches_eager_and_reports_compile_time(tiny_model_dir, eager):
    from torch._dynamo.utils import counters

    compiled = _backend(tiny_model_dir, compile="inductor")
    for batch, length in ((1, 9), (3, 9)):
        prompt = _prompt(batch, length, seed=batch)
        compiled.prepare(batch, length + 6)
        graphs = counters["stats"]["unique_graphs"]
        t_send, times = generate_timed(compiled, prompt, 6)  # what the runner times
        # prepare() compiled the graph the timed decode steps run: no (re)compile inside a latency.
        assert counters["stats"]["unique_graphs"] == graphs
        assert torch.equal(_generate(compiled, prompt, 6, prepare=False), _generate(eager, prompt, 6))
        seconds = compiled.describe()["compile_s_by_shape"][f"bs{batch}_len{length + 6}"]
        # The whole timed generation is a few ms; compiling (or loading it from the cache) is far longer.
        assert 0 < times[-1] - t_send < seconds
    facts = compiled.describe()
    assert facts["decode_step"] == "inductor" and facts["inductor_cache"] == ".cache/inductor"
    assert facts["compile_s"] == pytest.approx(sum(facts["compile_s_by_shape"].values()), abs=2e-3)
    assert set(facts["compile_s_by_shape"]) == {"bs1_len15", "bs3_len15"}


def test_compiled_prefill_compiles_outside_the_timed_call_and_matches_eager(tiny_model_dir, eager):
    from torch._dynamo.utils import counters

    compiled = _backend(tiny_model_dir, compile="inductor", compile_prefill=True)
    prompt = _prompt(2, 9, seed=5)
    compiled.prepare(2, 15)
    assert torch.equal(_generate(compiled, prompt, 6, prepare=False), _generate(eager, prompt, 6))
    graphs = counters["stats"]["unique_graphs"]
    generate_timed(compiled, prompt, 6)  # the same shape again: nothing compiles inside the timed call
    assert counters["stats"]["unique_graphs"] == graphs
    facts = compiled.describe()
    assert facts["prefill"] == "inductor" and facts["compile_s_by_shape"]["prefill_bs2_in9"] > 0
    assert _backend(tiny_model_dir, compile="inductor").describe()["prefill"] == "eager"


def test_compile_setting_is_validated(tiny_model_dir, default_raw):
    from pipeline import config

    raw = {**default_raw, "benchmark": {**default_raw["benchmark"], "compile": "on"}}
    with pytest.raises(ConfigError, match=r"benchmark.compile must be one of auto, inductor, eager; got 'on'"):
        config.from_dict(raw)
    with pytest.raises(PipelineError, match=r"benchmark.compile must be one of auto, inductor, eager; got False"):
        _backend(tiny_model_dir, compile=False)
