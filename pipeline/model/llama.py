"""Compact Llama 3 forward pass (gpt-fast style): RMSNorm, llama3-scaled RoPE, GQA, SwiGLU, static KV cache.

Parameter names are Hugging Face's (`model.layers.{l}.self_attn.q_proj.weight`, ...), so a Hugging Face state
dict, or one tensor-parallel rank's shard of it, loads with `load_state_dict(strict=True)`: a missing or
leftover name raises. The module can hold one pipeline stage (a layer range, with the embedding only on the
first stage and norm + lm_head only on the last) and one tensor-parallel rank (local head and column counts);
the collectives are added by pipeline.parallel.tp, so this file needs nothing but torch.
"""

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
    """q/k/v are column-parallel (local heads), o_proj row-parallel (local input columns).

    With tp > num_kv_heads every rank holds one KV head, replicated across tp/num_kv_heads ranks."""

    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        d, h = args.head_dim, args.hidden_size
        self.n_q = args.num_heads // tp
        self.n_kv = max(args.num_kv_heads // tp, 1)
        self.head_dim = d
        self.q_proj = nn.Linear(h, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_q * d, h, bias=False)
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, x, cos, sin, input_pos, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_q, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Static cache [b, n_kv, max_seq, d]: write this step's keys/values at their positions, attend to all
        # positions; the mask hides the ones not written yet.
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        groups = self.n_q // self.n_kv  # q head j uses kv head j // groups, as HF repeat_kv
        keys = self.k_cache[:b].repeat_interleave(groups, dim=1)
        values = self.v_cache[:b].repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_q * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        i = args.intermediate_size // tp
        self.gate_proj = nn.Linear(args.hidden_size, i, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, i, bias=False)
        self.down_proj = nn.Linear(i, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, tp: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
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
        self.max_seq_len = 0

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        if max_seq_len > self.args.max_position_embeddings:
            raise PipelineError(f"prompt + new tokens = {max_seq_len} exceeds max_position_embeddings="
                                f"{self.args.max_position_embeddings}")
        p = next(self.parameters())
        # float32 whatever the weights' dtype (HF keeps inv_freq in float32 too); not a buffer, so a model
        # built on the meta device and loaded with assign=True needs nothing else.
        self.inv_freq = rope_inv_freq(self.args).to(p.device)
        for block in self.model.layers.values():
            attn = block.self_attn
            shape = (batch, attn.n_kv, max_seq_len, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            attn.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.max_seq_len = max_seq_len
        self.causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=p.device).tril()

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x: token ids [b, s] on the first stage, else hidden states [b, s, hidden] from the previous stage.
        Returns hidden states, or this rank's logits slice on the last stage."""
        if self.max_seq_len == 0:
            raise PipelineError("Llama.setup_cache() must be called before forward()")
        if self.first:
            x = self.model.embed_tokens(x)
        # cos/sin in float32 then cast, as HF's rotary embedding does.
        freqs = input_pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = self.causal[input_pos][None, None]
        for block in self.model.layers.values():
            x = block(x, cos, sin, input_pos, mask)
        if not self.last:
            return x
        return self.lm_head(self.model.norm(x))


def hf_layout_state_dict(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """A full (tp=1) Hugging Face state dict as Llama(args) expects it: adds lm_head for tied embeddings."""
    state = dict(state)
    if "lm_head.weight" not in state and args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
