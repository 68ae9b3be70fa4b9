"""Compact Llama 3 forward pass (gpt-fast style): RMSNorm, llama3-scaled RoPE, GQA, SwiGLU, static KV cache.

Each layer runs 4 matmuls: q/k/v fused into `wqkv` (rows q | k | v), gate/up fused into `w13` (rows gate | up),
then o_proj and down_proj. The state dict still speaks Hugging Face: loading concatenates `q_proj`/`k_proj`/
`v_proj` (`gate_proj`/`up_proj`) into the fused weight, and `state_dict()` splits it back, so a Hugging Face
state dict, or one tensor-parallel rank's shard of it, loads with `load_state_dict(strict=True)`: a missing or
leftover name raises. The module can hold one pipeline stage (a layer range, with the embedding only on the
first stage and norm + lm_head only on the last) and one tensor-parallel rank (local head and column counts);
the collectives are added by pipeline.parallel.tp, so this file needs nothing but torch.

Static KV cache: per layer K and V of [batch, kv_heads, max_seq_len, head_dim], written with `index_copy_` at
the position tensor, read by scaled_dot_product_attention with `enable_gqa` (no repeated copy of the cache)
and a boolean causal mask row per position. cos/sin tables are precomputed for every position, so a decode
step has static shapes and no host-side values: it compiles to one graph (pipeline/model/fused.py)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs, padded_vocab

def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], float32, computed exactly as transformers 5 does (default and llama3)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if not args.rope_scaling:
        return inv_freq
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Neox / HF pairing: dimension i rotates with i + d/2 (FasterTransformer and TensorRT-LLM use the same).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _fuse_hf_weights(module: nn.Module, fused: str, parts: tuple[str, ...]) -> None:
    """Keep Hugging Face names in the state dict of a module whose `fused` linear holds `parts` stacked by rows.

    Loading: a pre-hook concatenates the parts' weights into `<fused>.weight` (load_state_dict copies the
    caller's dict first). When a part is absent nothing is fused, so strict loading reports the missing name.
    Saving: a post-hook splits the weight back into the parts' names, in place, keeping the module's order;
    only while `fused` is a plain nn.Linear (a quantized replacement keeps its own, fused, names)."""
    def load_hook(_module, state_dict, prefix, *_):
        names = [f"{prefix}{p}.weight" for p in parts]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(n) for n in names])

    def save_hook(mod, state_dict, prefix, _metadata):
        key = f"{prefix}{fused}.weight"
        if type(getattr(mod, fused)) is not nn.Linear or key not in state_dict:
            return
        own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        for k, v in own.items():
            if k != key:
                state_dict[k] = v
                continue
            for part, w in zip(parts, v.split(mod.fused_sizes[fused], dim=0)):
                state_dict[f"{prefix}{part}.weight"] = w

    module.register_load_state_dict_pre_hook(load_hook)
    module.register_state_dict_post_hook(save_hook)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """wqkv is column-parallel (local q heads | local kv heads | local kv heads), o_proj row-parallel (local
    input columns). With tp > num_kv_heads every rank holds one KV head, replicated across tp/num_kv_heads ranks."""

    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        d, h = args.head_dim, args.hidden_size
        self.n_q = args.num_heads // tp
        self.n_kv = max(args.num_kv_heads // tp, 1)
        self.head_dim = d
        self.fused_sizes = {"wqkv": [self.n_q * d, self.n_kv * d, self.n_kv * d]}
        self.wqkv = nn.Linear(h, sum(self.fused_sizes["wqkv"]), bias=False)
        self.o_proj = nn.Linear(self.n_q * d, h, bias=False)
        # Non-persistent buffers: not in the state dict; moved by .to(); static inputs to a compiled step.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        _fuse_hf_weights(self, "wqkv", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, cos, sin, input_pos, mask, new_sequence: bool, slots: Optional[torch.Tensor] = None):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.fused_sizes["wqkv"], dim=-1)
        q = q.view(b, s, self.n_q, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = self.k_cache, self.v_cache
        if slots is not None:
            # Rows `slots` of the cache, positions input_pos ([s], shared by the rows): new requests
            # joining a running batch (continuous batching) without touching the other rows.
            rows, cols = slots[:, None], input_pos[None, :]
            k_cache[rows, :, cols] = k.transpose(1, 2)
            v_cache[rows, :, cols] = v.transpose(1, 2)
        elif input_pos.dim() == 2:
            # One position per row ([b, 1]): row r is cache row r, each at its own length. Written into the
            # whole cache tensor, then sliced for reading: writing through the [:b] view instead made inductor
            # copy those b rows of K and V out and back every step (measured: 2x slower decode on an H200).
            rows = torch.arange(b, device=x.device)
            k_cache[rows, :, input_pos[:, 0]] = k[:, :, 0]
            v_cache[rows, :, input_pos[:, 0]] = v[:, :, 0]
            k_cache, v_cache = k_cache[:b], v_cache[:b]
        else:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        if new_sequence:
            # Positions 0..s-1 of new requests: this call's keys are the whole history, so a plain causal
            # kernel (flash attention on CUDA) runs on them, whatever earlier requests left in the cache.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif s == 1:
            # A decode step: the n_q / n_kv query heads sharing a KV head (j // group, as HF's repeat_kv) become
            # that head's query rows, so attention reads each cache entry once and never repeats K/V per query
            # head (measured on an H200: enable_gqa on a [b, n_kv, len, d] cache with a per-row mask ran at
            # half the speed the cache's size allows). The mask hides the slots past each row's position.
            group = self.n_q // self.n_kv
            y = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, group, self.head_dim), k_cache, v_cache,
                                               attn_mask=mask)
            y = y.reshape(b, self.n_q, 1, self.head_dim)
        else:
            # Attend to every cache slot; the mask hides the ones past each query's position (stale or zero).
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_q * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); w13 = gate | up, column-parallel, down row-parallel."""

    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        i = args.intermediate_size // tp
        self.fused_sizes = {"w13": [i, i]}
        self.w13 = nn.Linear(args.hidden_size, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, args.hidden_size, bias=False)
        _fuse_hf_weights(self, "w13", ("gate_proj", "up_proj"))

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x, cos, sin, input_pos, mask, new_sequence: bool, slots: Optional[torch.Tensor] = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, new_sequence, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    """Holds `embed_tokens`, `layers` and `norm` so the state-dict names carry HF's `model.` prefix."""


class Llama(nn.Module):
    """One (tp rank, pp stage) of Llama. tp=1 and all layers gives the whole model.

    `layers` are global indices; the state-dict names keep them (`model.layers.{l}.`). lm_head holds this
    rank's [padded_vocab/tp, hidden] rows; pipeline.parallel.tp gathers the full logits."""

    def __init__(self, args: LlamaArgs, *, tp: int = 1, layers: Optional[range] = None,
                 first: bool = True, last: bool = True):
        super().__init__()
        self.args, self.tp, self.first, self.last = args, tp, first, last
        self.layer_ids = list(range(args.num_layers) if layers is None else layers)
        self.model = _Body()
        if first:
            self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleDict({str(l): Block(args, tp) for l in self.layer_ids})
        if last:
            self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.lm_head = nn.Linear(args.hidden_size, padded_vocab(args.vocab_size, tp) // tp, bias=False)
        for name in ("rope_cos", "rope_sin", "causal"):  # [max_seq, head_dim] x2, [max_seq, max_seq] bool
            self.register_buffer(name, None, persistent=False)
        self.max_seq_len = 0
        self.cache_version = 0  # bumped by setup_cache(): a new set of cache tensors
        self.cache_batch = 0

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: the norms' (never quantized, unlike the linears, whose storage may be int8/fp8)."""
        return next(m.weight.dtype for m in self.modules() if isinstance(m, RMSNorm))

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        """(Re)allocate the static caches and tables for `batch` sequences of up to `max_seq_len` positions."""
        if max_seq_len > self.args.max_position_embeddings:
            raise PipelineError(f"prompt + new tokens = {max_seq_len} exceeds max_position_embeddings="
                                f"{self.args.max_position_embeddings}")
        dtype, device = self.dtype, next(self.parameters()).device
        # float32 whatever the weights' dtype (HF keeps inv_freq in float32 too); not a buffer, so a model
        # built on the meta device and loaded with assign=True needs nothing else.
        self.inv_freq = rope_inv_freq(self.args).to(device)
        # cos/sin in float32 then cast, as HF's rotary embedding does; row p = position p.
        freqs = torch.arange(max_seq_len, device=device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()
        for block in self.model.layers.values():
            attn = block.self_attn
            shape = (batch, attn.n_kv, max_seq_len, attn.head_dim)
            # Zeros, not empty: masked slots still enter attention's P @ V with weight 0, and 0 * NaN = NaN.
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len, self.cache_batch = max_seq_len, batch
        # New tensors at new addresses: a CUDA graph captured over the old ones must not be replayed.
        self.cache_version += 1

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, *, new_sequence: bool = False,
                last_only: bool = False, slots: Optional[torch.Tensor] = None,
                last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [b, s] on the first stage, else hidden states [b, s, hidden] from the previous stage;
        input_pos: the s positions (int64 tensor [s]), or one position per row ([b, 1], a decode step of
        sequences at different lengths in cache rows 0..b-1: continuous batching). new_sequence: input_pos is
        0..s-1 (a prefill), so attention needs only this call's keys. slots: with new_sequence, the cache rows
        [b] this prefill writes (default: rows 0..b-1 = the whole cache batch). last_only: logits of the last
        position only ([b, 1, V]); last_index: of position last_index[r] for row r instead ([b, 1, V]; right-
        padded prompts of different lengths). Returns hidden states, or this rank's logits slice on the last
        stage."""
        if self.max_seq_len == 0:
            raise PipelineError("Llama.setup_cache() must be called before forward()")
        per_row = input_pos.dim() == 2
        if slots is not None and not new_sequence:
            raise PipelineError("Llama.forward: slots= is for a prefill (new_sequence=True)")
        if (per_row or slots is not None) and x.shape[0] > self.cache_batch:
            raise PipelineError(f"{x.shape[0]} rows but the KV cache holds {self.cache_batch}")
        if not (per_row or slots is not None) and x.shape[0] != self.cache_batch:
            raise PipelineError(f"batch of {x.shape[0]} sequences but the KV cache holds {self.cache_batch}; "
                                f"call setup_cache() with this batch size")
        if self.first:
            x = self.model.embed_tokens(x)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if per_row:  # [b, 1, d] -> [b, 1 (heads), 1, d]; the mask row of each row's own position
            cos, sin, mask = cos[:, None], sin[:, None], self.causal[input_pos][:, None]
        else:
            mask = self.causal[input_pos][None, None]
        for block in self.model.layers.values():
            x = block(x, cos, sin, input_pos, mask, new_sequence, slots)
        if not self.last:
            return x
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


def hf_layout_state_dict(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """A full (tp=1) Hugging Face state dict as Llama(args) expects it: adds lm_head for tied embeddings."""
    state = dict(state)
    if "lm_head.weight" not in state and args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
