"""pipeline/model/llama.py: fused wqkv / w13 behind Hugging Face state-dict names, the static KV cache,
and the prefill path (new_sequence) against the masked path over the cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import hf_tensors
from pipeline.model.args import LlamaArgs
from pipeline.model.llama import Llama, hf_layout_state_dict


@pytest.fixture(scope="module")
def hf_state(tiny_model_dir):
    args = LlamaArgs.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), "config.json")
    return args, hf_layout_state_dict(load_file(str(tiny_model_dir / "model.safetensors")), args)


def test_each_layer_runs_four_matmuls_on_fused_weights(hf_state):
    args, state = hf_state
    model = Llama(args)
    model.load_state_dict(state, strict=True)
    for l, block in model.model.layers.items():
        linears = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        assert linears == ["self_attn.wqkv", "self_attn.o_proj", "mlp.w13", "mlp.down_proj"]
        p = f"model.layers.{l}."
        assert torch.equal(block.self_attn.wqkv.weight, torch.cat([state[p + f"self_attn.{x}_proj.weight"]
                                                                   for x in "qkv"]))
        assert torch.equal(block.mlp.w13.weight, torch.cat([state[p + "mlp.gate_proj.weight"],
                                                            state[p + "mlp.up_proj.weight"]]))


def test_state_dict_keeps_hugging_face_names_and_round_trips(hf_state):
    args, state = hf_state
    model = Llama(args)
    model.load_state_dict(state, strict=True)
    saved = model.state_dict()
    # Same names in checkpoint order (no caches or tables: they are non-persistent buffers).
    assert list(saved) == hf_tensors.names(args)
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    again = Llama(args)
    again.load_state_dict(saved, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_missing_or_leftover_hf_name_still_fails_strict_loading(hf_state):
    args, state = hf_state
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.self_attn\.wqkv\.weight"):
        Llama(args).load_state_dict(missing, strict=True)
    extra = {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*q_proj\.bias"):
        Llama(args).load_state_dict(extra, strict=True)


def test_cache_tables_and_shapes_follow_setup_cache(hf_state):
    args, state = hf_state
    model = Llama(args).to(torch.bfloat16)
    model.load_state_dict(state, strict=True)
    model.setup_cache(3, 40)
    for block in model.model.layers.values():
        for cache in (block.self_attn.k_cache, block.self_attn.v_cache):
            assert cache.shape == (3, args.num_kv_heads, 40, args.head_dim) and cache.dtype == torch.bfloat16
            assert not cache.any()
    assert model.rope_cos.shape == (40, args.head_dim) and model.causal.shape == (40, 40)
    assert model.causal[5].tolist() == [True] * 6 + [False] * 34
    model.setup_cache(1, 8)
    assert block.self_attn.k_cache.shape == (1, args.num_kv_heads, 8, args.head_dim)
    with torch.inference_mode(), pytest.raises(PipelineError, match="batch of 2 sequences but the KV cache holds 1"):
        model(torch.zeros(2, 3, dtype=torch.int64), torch.arange(3))


def test_prefill_path_equals_attention_over_the_cache(hf_state):
    """new_sequence=True attends to this call's keys only (flash-eligible); it must match the masked path over
    a cache that holds stale values from a longer earlier request."""
    args, state = hf_state
    model = Llama(args)
    model.load_state_dict(state, strict=True)
    model.eval()
    ids = torch.randint(2, 512, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model.setup_cache(2, 24)
        model(torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(4)), torch.arange(24))
        masked = model(ids, torch.arange(11))
        fresh = model(ids, torch.arange(11), new_sequence=True)
        last = model(ids, torch.arange(11), new_sequence=True, last_only=True)
    torch.testing.assert_close(fresh, masked, atol=1e-5, rtol=0)
    assert last.shape == (2, 1, args.vocab_size)
    torch.testing.assert_close(last, fresh[:, -1:], atol=1e-5, rtol=0)  # lm_head on 1 row: other matmul blocking
