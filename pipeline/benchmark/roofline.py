"""The roofline of every benchmark result: what a Llama decode step and a prefill must move and compute,
and the fastest the hardware could do it.

A decode step reads every weight matrix once at its storage precision (8-bit weights with their per-output-
channel scales), the looked-up embedding rows, the RMSNorm weights and the KV cache up to the current length;
it computes 2 FLOPs per matmul weight per sequence plus attention. Its lower bound is
max(bytes / bandwidth, FLOPs / peak); `roofline_pct` = that bound / measured TPOT. A prefill computes the same
matmuls for every prompt token (lm_head only for the last position: the first token needs no other logits)
plus causal attention; `mfu_pct` = prefill FLOPs / TTFT / peak.

Units: bytes, FLOPs, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, ms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.model.args import LlamaArgs
from pipeline.precision import PRECISIONS

# Per output channel of an 8-bit weight: the ONNX QDQ graph stores a float32 scale and an int8 zero point
# (onnxruntime per-channel DequantizeLinear); the torch weight-quantized precisions one float32 scale
# (pipeline/model/quant.py: torch._scaled_mm requires float32 scales).
QDQ_CHANNEL_BYTES = 4 + 1
TORCH_CHANNEL_BYTES = 4
# Bytes of the unquantized tensors (norms, embedding rows, a float lm_head, the KV cache) of the ONNX int8
# graph: it is quantized from the fp32 export, so everything outside Q/DQ stays float32.
QDQ_FLOAT_BYTES = 4
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Storage:
    """Bytes per element as a precision stores a model."""

    weight: int            # a matmul weight
    channel: int           # per output channel of a quantized matmul (scales, zero points); 0 = not quantized
    float: int             # norms, embedding rows, an unquantized lm_head, the KV cache (the compute dtype)


def storage(precision: str) -> Storage:
    p = PRECISIONS.get(precision)
    if p is None:
        raise PipelineError(f"precision.name {precision!r} is not in the precision table ({', '.join(PRECISIONS)})")
    if p.bits >= 16:
        return Storage(p.bits // 8, 0, p.bits // 8)
    if p.torch_dtype is None:  # int8: the ONNX QDQ graph
        return Storage(1, QDQ_CHANNEL_BYTES, QDQ_FLOAT_BYTES)
    return Storage(1, TORCH_CHANNEL_BYTES, _TORCH_DTYPE_BYTES[p.torch_dtype])


def peak_dtype(precision: str) -> str:
    """The dtype the matmuls of `precision` run in, as hardware.peak_tflops names it: fp8 activations run on
    fp8 tensor cores, the W8A8 ONNX graph on int8 ones, weight-only 8-bit precisions dequantize into their
    compute dtype."""
    p = PRECISIONS[precision]
    if p.activations == "fp8_e4m3":
        return "fp8"
    if p.torch_dtype is None:
        return "int8"
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[p.torch_dtype]


def layer_matmuls(a: LlamaArgs) -> list[tuple[int, int]]:
    """(out_features, in_features) of one decoder layer's weight matrices: q, k, v, o, gate, up, down."""
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    return [(q, a.hidden_size), (kv, a.hidden_size), (kv, a.hidden_size), (a.hidden_size, q),
            (a.intermediate_size, a.hidden_size), (a.intermediate_size, a.hidden_size),
            (a.hidden_size, a.intermediate_size)]


def matmul_params(a: LlamaArgs) -> int:
    """Weights of every matmul: all layers plus lm_head (a tied lm_head is still read as a matmul)."""
    return a.num_layers * sum(o * i for o, i in layer_matmuls(a)) + a.vocab_size * a.hidden_size


def weight_bytes(a: LlamaArgs, precision: str, batch: int, lm_head_quantized: bool = True) -> int:
    """Bytes of weights one decode step reads: every matrix once (+ its channel scales when quantized), the
    norms, and only the `batch` embedding rows looked up. `lm_head_quantized` matters only for 8-bit precisions."""
    s = storage(precision)
    layers = a.num_layers * sum(o * i * s.weight + o * s.channel for o, i in layer_matmuls(a))
    if s.channel and lm_head_quantized:
        lm_head = a.vocab_size * (a.hidden_size * s.weight + s.channel)
    else:
        lm_head = a.vocab_size * a.hidden_size * s.float
    norms = (2 * a.num_layers + 1) * a.hidden_size * s.float
    embedding_rows = batch * a.hidden_size * s.float
    return layers + lm_head + norms + embedding_rows


def stored_weight_bytes(a: LlamaArgs, precision: str) -> int:
    """Bytes the weights occupy on the device at `precision`: a decode step's read plus the whole embedding table."""
    return weight_bytes(a, precision, batch=a.vocab_size)


def kv_bytes(a: LlamaArgs, precision: str, batch: int, prompt_length: int, output_length: int) -> int:
    """KV cache read per decode step, averaged over the scenario's output_length - 1 steps: step k (1-based)
    attends prompt + k positions, so the mean length is prompt + output / 2; K and V, every layer and KV head,
    in the compute dtype. Written as (2 * prompt + output) to stay an integer."""
    per_position = batch * a.num_layers * 2 * a.num_kv_heads * a.head_dim * storage(precision).float
    return per_position * (2 * prompt_length + output_length) // 2


def decode_flops(a: LlamaArgs, batch: int, prompt_length: int, output_length: int) -> int:
    """FLOPs of one decode step: 2 per matmul weight per sequence, plus attention (q.K and p.V: 4 * head_dim per
    head and attended position) at the mean length prompt + output / 2."""
    attention = 2 * batch * a.num_layers * a.num_heads * a.head_dim * (2 * prompt_length + output_length)
    return 2 * matmul_params(a) * batch + attention


def prefill_flops(a: LlamaArgs, batch: int, prompt_length: int) -> int:
    """FLOPs of a prefill: every layer matmul for every prompt token, lm_head for the last position only,
    and causal attention (position i attends i positions: 4 * head_dim * i per head, summed over i)."""
    layers = a.num_layers * sum(o * i for o, i in layer_matmuls(a))
    attention = 2 * batch * a.num_layers * a.num_heads * a.head_dim * prompt_length * (prompt_length + 1)
    return 2 * layers * batch * prompt_length + 2 * a.vocab_size * a.hidden_size * batch + attention


@dataclass(frozen=True)
class Hardware:
    """The figures a bound is computed from, for one device (a tp-way split on GPUs uses tp of them)."""

    memory_bandwidth_gbs: float
    peak_tflops: float
    devices: int = 1


def decode_bound_ms(bytes_per_step: int, flops_per_step: int, hw: Hardware) -> float:
    memory_s = bytes_per_step / (hw.memory_bandwidth_gbs * 1e9 * hw.devices)
    compute_s = flops_per_step / (hw.peak_tflops * 1e12 * hw.devices)
    return max(memory_s, compute_s) * 1e3


@dataclass(frozen=True)
class ScenarioRoofline:
    """The roofline figures of one scenario; `fields()` are the columns every benchmark row and summary gets."""

    decode_bytes_per_step: int
    decode_flops_per_step: int
    prefill_flops: int
    hardware: Hardware

    @property
    def decode_bound_ms(self) -> float:
        return decode_bound_ms(self.decode_bytes_per_step, self.decode_flops_per_step, self.hardware)

    def fields(self, ttft_ms: float, tpot_ms: float) -> dict[str, Any]:
        """The columns for a result with this TTFT and TPOT (percentages of the hardware's best)."""
        peak_flops_per_ms = self.hardware.peak_tflops * 1e9 * self.hardware.devices
        return {"decode_bytes_per_step": self.decode_bytes_per_step,
                "decode_flops_per_step": self.decode_flops_per_step, "prefill_flops": self.prefill_flops,
                "memory_bandwidth_gbs": _significant(self.hardware.memory_bandwidth_gbs),
                "peak_tflops": _significant(self.hardware.peak_tflops),
                "decode_bound_ms": _significant(self.decode_bound_ms),
                "roofline_pct": _significant(100 * self.decode_bound_ms / tpot_ms),
                "mfu_pct": _significant(100 * self.prefill_flops / ttft_ms / peak_flops_per_ms)}


def _significant(value: float, digits: int = 6) -> float:
    # Significant digits, not decimals: a tiny model's CPU roofline is ~0.05 % and a bound can be ~0.01 ms.
    return float(f"{value:.{digits}g}")


def scenario(a: LlamaArgs, precision: str, batch: int, prompt_length: int, output_length: int, hw: Hardware,
             lm_head_quantized: bool = True) -> ScenarioRoofline:
    return ScenarioRoofline(
        decode_bytes_per_step=weight_bytes(a, precision, batch, lm_head_quantized)
        + kv_bytes(a, precision, batch, prompt_length, output_length),
        decode_flops_per_step=decode_flops(a, batch, prompt_length, output_length),
        prefill_flops=prefill_flops(a, batch, prompt_length), hardware=hw)


def serving_bound(a: LlamaArgs, precision: str, max_num_seqs: int, prompt_length: int, output_length: int,
                  hw: Hardware, lm_head_quantized: bool = True) -> float:
    """Output tokens/s a server with max_num_seqs slots could reach at most on requests of these lengths: each
    wave of max_num_seqs requests prefilled at peak FLOP/s, then decoded at the decode roofline of that batch
    (weights once per step plus every sequence's KV cache). The bound for maximum load."""
    cost = scenario(a, precision, max_num_seqs, prompt_length, output_length, hw, lm_head_quantized)
    prefill_s = cost.prefill_flops / (hw.peak_tflops * 1e12 * hw.devices)
    decode_s = (output_length - 1) * cost.decode_bound_ms / 1e3
    return max_num_seqs * output_length / (prefill_s + decode_s)
