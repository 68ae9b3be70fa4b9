"""Roofline of every benchmark result: bytes and FLOPs of a decode step and a prefill against the issue's hand
figures (Llama-3-8B on the H100/H200) and hand-counted sums for the tiny model; the hardware figures (presets,
validation, on-the-spot measurement)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import config
from pipeline.benchmark import hardware, roofline
from pipeline.errors import ConfigError, PipelineError
from pipeline.model.args import LlamaArgs
from tests.conftest import ROOT

LLAMA3_8B = LlamaArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=8192)
# conf/model/tiny.yaml: head_dim 64 / 8 = 8, so q is 64 wide and k, v 2 * 8 = 16.
TINY = LlamaArgs(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=8, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=512)
H200 = roofline.Hardware(memory_bandwidth_gbs=4300, peak_tflops=784)   # measured on the lent H200
H100 = roofline.Hardware(memory_bandwidth_gbs=3020, peak_tflops=803)


def test_llama3_8b_bf16_batch1_reads_15_01_gb_per_token_and_its_bound_is_3_49_ms_on_the_h200():
    assert 2 * roofline.matmul_params(LLAMA3_8B) == pytest.approx(15.01e9, abs=0.005e9)  # every weight matrix
    weights = roofline.weight_bytes(LLAMA3_8B, "bf16", batch=1)
    # Beyond the matrices: 65 RMSNorm vectors and one looked-up embedding row, not the 1.05 GB table.
    assert weights - 2 * roofline.matmul_params(LLAMA3_8B) == (65 + 1) * 4096 * 2
    # One-token prompt, two output tokens: one decode step, the KV cache (2 positions) adds 0.26 MB.
    cost = roofline.scenario(LLAMA3_8B, "bf16", 1, 1, 2, H200)
    assert cost.decode_bytes_per_step == weights + 32 * 2 * 8 * 128 * 2 * 2
    assert cost.decode_bound_ms == pytest.approx(3.49, abs=0.005)
    assert roofline.scenario(LLAMA3_8B, "bf16", 1, 1, 2, H100).decode_bound_ms == pytest.approx(4.97, abs=0.005)


@pytest.mark.parametrize("precision", ["int8-wo", "fp8-wo", "fp8", "int8"])
def test_8bit_weights_read_7_50_gb_with_lm_head_quantized_and_8_03_gb_with_lm_head_in_the_compute_dtype(precision):
    # The figures count the matrices only; the channel scales add 5 to 8 MB (see the next test).
    quantized = roofline.scenario(LLAMA3_8B, precision, 1, 1, 2, H200, lm_head_quantized=True)
    assert quantized.decode_bytes_per_step == pytest.approx(7.50e9, abs=0.015e9)
    assert quantized.decode_bound_ms == pytest.approx(1.74, abs=0.01)
    if precision != "int8":  # the torch precisions keep lm_head in bf16
        float_head = roofline.scenario(LLAMA3_8B, precision, 1, 1, 2, H200, lm_head_quantized=False)
        assert float_head.decode_bytes_per_step == pytest.approx(8.03e9, abs=0.01e9)
        assert float_head.decode_bound_ms == pytest.approx(1.87, abs=0.005)


def test_8bit_channel_scales_are_counted_at_their_size():
    # Output channels per layer: q 4096 + k 1024 + v 1024 + o 4096 + gate/up 2 * 14336 + down 4096 = 43008.
    channels = 32 * 43008 + 128256
    base = roofline.matmul_params(LLAMA3_8B) + (65 + 1) * 4096 * 2  # 1 byte per weight; norms, one row in bf16
    assert roofline.weight_bytes(LLAMA3_8B, "int8-wo", 1) == base + channels * 4  # float32 scales (model/quant.py)
    # ONNX QDQ: float32 scale + int8 zero point per channel; its norms and rows are float32.
    assert roofline.weight_bytes(LLAMA3_8B, "int8", 1) == base + (65 + 1) * 4096 * 2 + channels * 5


def test_tiny_model_bytes_and_flops_counted_by_hand():
    batch, prompt, out = 2, 8, 4
    # Per layer: q 64*64 + k 16*64 + v 16*64 + o 64*64 + gate, up, down 3 * 192*64 = 47104; 4 layers; lm_head 512*64.
    layers, lm_head = 4 * 47104, 512 * 64
    assert roofline.matmul_params(TINY) == layers + lm_head == 221184
    # fp32: matrices + 9 norm vectors of 64 + 2 embedding rows of 64, 4 bytes each.
    assert roofline.weight_bytes(TINY, "fp32", batch) == (221184 + 9 * 64 + 2 * 64) * 4 == 887552
    assert roofline.weight_bytes(TINY, "bf16", batch) == 887552 // 2
    # KV: steps 1..3 attend 9, 10, 11 positions (mean 10) x K and V x 4 layers x 2 KV heads x head_dim 8 x 2 sequences.
    assert roofline.kv_bytes(TINY, "fp32", batch, prompt, out) == 10 * 2 * 4 * 2 * 8 * batch * 4 == 10240
    # int8 QDQ: 1 byte per weight, 608 output channels per layer + 512 of lm_head at 5 bytes, float32 norms/rows.
    assert roofline.weight_bytes(TINY, "int8", batch) == 221184 + (4 * 608 + 512) * 5 + (9 + 2) * 64 * 4 == 238720
    assert roofline.weight_bytes(TINY, "int8", batch, lm_head_quantized=False) == (
        layers + 4 * 608 * 5 + lm_head * 4 + (9 + 2) * 64 * 4)
    # Decode FLOPs: 2 per weight per sequence + attention 4 * head_dim per head and attended position (mean 10).
    assert roofline.decode_flops(TINY, batch, prompt, out) == 2 * 221184 * 2 + 4 * 2 * 4 * 8 * 8 * 10 == 905216
    # Prefill: layers for 16 tokens, lm_head for the 2 last positions, causal attention over 1 + 2 + ... + 8 = 36.
    assert roofline.prefill_flops(TINY, batch, prompt) == (
        2 * layers * 2 * 8 + 2 * lm_head * 2 + 4 * 2 * 4 * 8 * 8 * 36) == 6234112


@pytest.mark.parametrize("prompt,out", [(1, 2), (8, 4), (7, 5), (128, 64)])
def test_kv_bytes_are_the_mean_over_the_decode_steps(prompt, out):
    per_position = 3 * 4 * 2 * 2 * 8 * 2  # batch 3, bf16
    steps = [per_position * (prompt + k) for k in range(1, out)]  # step k attends prompt + k positions
    assert roofline.kv_bytes(TINY, "bf16", 3, prompt, out) == pytest.approx(sum(steps) / len(steps))


def test_the_bound_is_memory_at_small_batch_and_compute_at_large_batch():
    small = roofline.scenario(LLAMA3_8B, "bf16", 1, 128, 64, H100)
    assert small.decode_bound_ms == pytest.approx(small.decode_bytes_per_step / 3020e9 * 1e3)
    large = roofline.scenario(LLAMA3_8B, "bf16", 1024, 128, 64, H100)
    assert large.decode_bound_ms == pytest.approx(large.decode_flops_per_step / 803e12 * 1e3)
    # A 2-way tensor-parallel split on GPUs reads half the bytes per device.
    split = roofline.scenario(LLAMA3_8B, "bf16", 1, 128, 64, roofline.Hardware(3020, 803, devices=2))
    assert split.decode_bound_ms == pytest.approx(small.decode_bound_ms / 2)


def test_fields_are_percentages_of_the_bound_and_of_the_peak():
    cost = roofline.scenario(TINY, "fp32", 2, 8, 4, roofline.Hardware(10.0, 0.1))
    fields = cost.fields(ttft_ms=2.0, tpot_ms=0.5)
    bound = (887552 + 10240) / 10e9 * 1e3  # memory-bound: 0.0898 ms vs 905216 / 0.1e12 s = 0.00905 ms
    assert fields["decode_bound_ms"] == pytest.approx(bound, rel=1e-5)
    assert fields["roofline_pct"] == pytest.approx(100 * bound / 0.5, rel=1e-5)
    assert fields["mfu_pct"] == pytest.approx(100 * 6234112 / 2e-3 / 0.1e12, rel=1e-5)
    assert (fields["memory_bandwidth_gbs"], fields["peak_tflops"]) == (10.0, 0.1)


def test_each_precision_names_its_matmul_dtype():
    assert {p: roofline.peak_dtype(p) for p in ("fp32", "fp16", "bf16", "int8", "int8-wo", "fp8-wo", "fp8")} == {
        "fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "int8-wo": "bf16", "fp8-wo": "bf16",
        "fp8": "fp8"}
    assert {roofline.peak_dtype(p) for p in ("fp32", "int8", "fp8")} <= set(config.HardwareConfig.PEAK_DTYPES)
    with pytest.raises(PipelineError, match="precision.name 'int4' is not in the precision table"):
        roofline.storage("int4")


# --- hardware figures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,bandwidth,bf16,fp8", [("h100", 3350, 989.5, 1979), ("h200", 4800, 989.5, 1979),
                                                        ("a100", 2039, 312, None), ("l40s", 864, 362.05, 733)])
def test_gpu_presets_carry_published_figures(preset, bandwidth, bf16, fp8):
    from pipeline.compose import compose_dict

    cfg = config.from_dict(compose_dict(ROOT / "conf", [f"hardware={preset}"]))
    hw = cfg.hardware
    assert hw.device == "cuda" and hw.name.startswith("NVIDIA") and hw.measure is False
    assert hw.memory_bandwidth_gbs == bandwidth and hw.peak_tflops["bf16"] == bf16
    assert hw.peak_tflops.get("fp8") == fp8 and {"fp32", "fp16", "int8"} <= set(hw.peak_tflops)
    # Datasheet figures are upper bounds: above the copy bandwidth and bf16 matmul measured on the lent GPUs.
    measured = {"h100": (3020, 803), "h200": (4300, 784)}.get(preset)
    if measured:
        assert hw.memory_bandwidth_gbs > measured[0] and hw.peak_tflops["bf16"] > measured[1]


@pytest.mark.parametrize("preset", ["cpu", "cuda"])
def test_generic_presets_measure(preset):
    from pipeline.compose import compose_dict

    hw = config.from_dict(compose_dict(ROOT / "conf", [f"hardware={preset}"])).hardware
    assert hw.measure is True and hw.memory_bandwidth_gbs is None and hw.peak_tflops == {}


@pytest.mark.parametrize("update,message", [
    ({"memory_bandwidth_gbs": -1.0}, "hardware.memory_bandwidth_gbs must be > 0 or null, got -1.0"),
    ({"peak_tflops": {"tf32": 1.0}}, "hardware.peak_tflops.tf32 is not a known dtype (fp32, fp16, bf16, fp8, int8)"),
    ({"peak_tflops": {"bf16": 0.0}}, "hardware.peak_tflops.bf16 must be > 0, got 0.0"),
    ({"measure": False}, "hardware.measure is false but hardware.memory_bandwidth_gbs or hardware.peak_tflops is not"),
    ({"peak_tflops": {"bf16": "fast"}}, "hardware.peak_tflops.bf16 has the wrong type"),
])
def test_hardware_figures_are_validated_in_one_line_naming_the_key(raw, update, message):
    raw["hardware"].update(update)
    with pytest.raises(ConfigError) as e:
        config.from_dict(copy.deepcopy(raw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_published_figures_are_used_as_given_and_a_missing_one_is_named():
    hw = {"measure": False, "name": "NVIDIA H200 SXM 141GB", "memory_bandwidth_gbs": 4800,
          "peak_tflops": {"bf16": 989.5}}
    got = hardware.figures(hw, torch.device("cpu"), "bf16")
    assert got == {"name": "NVIDIA H200 SXM 141GB", "peak_dtype": "bf16", "source": "published",
                   "memory_bandwidth_gbs": 4800.0, "peak_tflops": 989.5}
    with pytest.raises(PipelineError, match=r"^hardware.peak_tflops.fp8 is not set and hardware.measure=false"):
        hardware.figures(hw, torch.device("cpu"), "fp8")
    with pytest.raises(PipelineError, match=r"^hardware.memory_bandwidth_gbs is not set"):
        hardware.published({**hw, "memory_bandwidth_gbs": None}, "bf16")


SMALL = hardware.Budget(copy_bytes=16 << 20, copy_s=0.05, matmul_max_n=512, matmul_target_s=0.01, matmul_s=0.05)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_measurement_on_this_cpu(dtype):
    got = hardware.measure(torch.device("cpu"), dtype, SMALL)
    # Any machine this runs on copies faster than 100 MB/s and multiplies faster than 1 GFLOP/s, and slower than
    # 10 TB/s / 10 PFLOP/s: numbers outside that are a unit or formula error, not a slow machine.
    assert 0.1 < got["memory_bandwidth_gbs"] < 10_000 and 1e-3 < got["peak_tflops"] < 10_000
    assert got["method"].startswith(f"copy of 16 MiB (read + written); {dtype} matmul") and got["seconds"] > 0


def test_measured_figures_keep_the_published_ones_for_comparison(monkeypatch):
    monkeypatch.setitem(hardware.BUDGETS, "cpu", SMALL)
    hw = {"measure": True, "name": "this CPU", "memory_bandwidth_gbs": 50.0, "peak_tflops": {"fp32": 2.0}}
    got = hardware.figures(hw, torch.device("cpu"), "fp32")
    assert got["source"] == "measured"
    assert got["published"] == {"memory_bandwidth_gbs": 50.0, "peak_tflops": {"fp32": 2.0}}
    assert got["peak_tflops"] != 2.0 and got["name"] == "this CPU"


def test_fp8_cannot_be_measured_on_a_cpu():
    with pytest.raises(PipelineError, match=r"^hardware.measure=true: fp8 matmuls need a CUDA device"):
        hardware.measure(torch.device("cpu"), "fp8", SMALL)
