"""Typed schema of the composed config (params.yaml) and its validation.

conf/ --compose--> params.yaml --load()--> PipelineConfig (dataclasses, validated).
Every rejection is a ConfigError whose one-line message names the dotted key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import math
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from pipeline import paths
from pipeline.backends.registry import BACKENDS
from pipeline.engines.profiles import DIMS as ENGINE_DIMS
from pipeline.engines.profiles import uncovered_calls
from pipeline.errors import ConfigError, PipelineError, redact
from pipeline.model.hf_config import SHAPE_KEYS
from pipeline.parallel.mapping import CHECKPOINT_FORMATS, check_layout
from pipeline.precision import FLOAT_PRECISIONS, PRECISIONS, STORAGE_DTYPES

SOURCES = ("preset", "local", "hub")
DEVICES = ("cpu", "cuda")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TOKENIZERS = ("embedded", "source")
# The settings where an infinite number means something (every request at once); everywhere else inf is rejected.
ALLOWS_INF = ("serving.request_rates",)


def allows_inf(key: str) -> bool:
    """Whether the setting `key` (list items as key[i]) may be inf."""
    return key.split("[")[0] in ALLOWS_INF


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key} {problem}")


def _check_positive(key: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        _fail(key, f"must be >= {minimum}, got {value}")


def _check_finite_positive(key: str, value: int | float) -> None:
    if not 1 <= value < float("inf"):
        _fail(key, f"must be >= 1, got {value}")


def _check_timeout(key: str, value: float) -> None:
    # Past threading.TIMEOUT_MAX (about 292 years) socket and thread waits raise OverflowError.
    if not 0 < value <= threading.TIMEOUT_MAX:
        _fail(key, f"must be > 0 seconds and at most {threading.TIMEOUT_MAX:.0f}, got {value}")


def _check_seed(key: str, value: int) -> None:
    # numpy's default_rng refuses negative seeds; torch would wrap them silently.
    _check_positive(key, value, 0)


def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        _fail(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class RopeScaling:
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        _check_choice("model.rope_scaling.rope_type", self.rope_type, ("llama3",))
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if getattr(self, name) <= 0:
                _fail(f"model.rope_scaling.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.high_freq_factor <= self.low_freq_factor:
            _fail("model.rope_scaling.high_freq_factor", "must be greater than model.rope_scaling.low_freq_factor")
        _check_positive("model.rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings)


@dataclass
class ModelConfig:
    name: str = "tiny"
    source: str = "preset"
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    local_dir: Optional[str] = None
    seed: int = 1234
    # Storage dtype of random-init weights (source=preset). local/hub weights are copied as stored: null, or
    # the dtype they are stored in (the weights stage checks); precision.name sets the compute dtype.
    dtype: Optional[str] = "float32"
    tokenizer: str = "embedded"
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    # Brief training of a preset on the embedded corpus (0 = pure random init); see pipeline/model/train_tiny.py.
    train_steps: int = 0
    train_lr: float = 2e-3

    def validate(self) -> None:
        _check_choice("model.source", self.source, SOURCES)
        _check_seed("model.seed", self.seed)
        _check_positive("model.train_steps", self.train_steps, 0)
        if self.train_lr <= 0:
            _fail("model.train_lr", f"must be > 0, got {self.train_lr}")
        if self.source == "preset" and self.dtype is None:
            _fail("model.dtype", f"is required when model.source=preset (one of {', '.join(STORAGE_DTYPES)})")
        if self.dtype is not None:
            _check_choice("model.dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("model.tokenizer", self.tokenizer, TOKENIZERS)
        if self.source == "hub" and not self.hub_id:
            _fail("model.hub_id", "is required when model.source=hub (e.g. meta-llama/Meta-Llama-3-8B)")
        if self.source == "local" and not self.local_dir:
            _fail("model.local_dir", "is required when model.source=local (a directory with config.json and *.safetensors)")
        if self.source == "preset":
            missing = [k for k in SHAPE_KEYS if getattr(self, k) is None]
            if missing:
                _fail(f"model.{missing[0]}", "is required when model.source=preset (random init needs the full shape)")
        if self.train_steps and (self.source != "preset" or self.tokenizer != "embedded"):
            _fail("model.train_steps", "needs model.source=preset and model.tokenizer=embedded (it trains on the "
                  "embedded corpus); set it to 0")
        if self.tokenizer == "embedded" and self.source != "preset":
            _fail("model.tokenizer", "must be 'source' unless model.source=preset (hub and local models bring their own)")
        for key in SHAPE_KEYS:
            value = getattr(self, key)
            if value is not None:
                _check_positive(f"model.{key}", value)
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            _fail("model.num_heads", f"must divide model.hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.num_heads and self.hidden_size and (self.hidden_size // self.num_heads) % 2:
            # RoPE rotates pairs of dimensions (Hugging Face refuses to build such a model).
            _fail("model.num_heads", f"gives a head dimension {self.hidden_size // self.num_heads} (model.hidden_size="
                  f"{self.hidden_size} / {self.num_heads}); it must be even for rotary embeddings")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            _fail("model.num_kv_heads", f"must divide model.num_heads={self.num_heads} (grouped-query attention), got {self.num_kv_heads}")
        if self.rope_theta <= 0:
            _fail("model.rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            _fail("model.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and self.vocab_size and not 0 <= value < self.vocab_size:
                _fail(f"model.{key}", f"must be in [0, model.vocab_size={self.vocab_size}), got {value}")


@dataclass
class PrecisionConfig:
    name: str = "fp32"

    def validate(self) -> None:
        _check_choice("precision.name", self.name, tuple(PRECISIONS))


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1

    def validate(self) -> None:
        _check_positive("parallel.tp", self.tp)
        _check_positive("parallel.pp", self.pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass
class BenchmarkConfig:
    backends: list[str] = field(default_factory=lambda: ["torch"])
    prompt_lengths: list[int] = field(default_factory=lambda: [32])
    output_length: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup_runs: int = 2
    measured_runs: int = 10
    seed: int = 0
    # Decode step of the backends built on pipeline/model/llama.py (torch-compiled, torch-tp): auto = inductor
    # (CUDA graphs) on CUDA, eager on CPU; inductor = always compile; eager = never.
    compile: str = "auto"
    # torch-compiled: also compile the prefill forward (inductor, no CUDA graph), once per (batch, prompt length)
    # before its first timed use; its compile time is reported with the decode step's, never in TTFT.
    compile_prefill: bool = False
    timeout_s: float = 1800.0  # per backend (load, compile, every scenario); past it the worker is stopped, failed

    def validate(self) -> None:
        _check_timeout("benchmark.timeout_s", self.timeout_s)
        if not self.backends:
            _fail("benchmark.backends", f"must name at least one backend ({', '.join(BACKENDS)})")
        for i, name in enumerate(self.backends):
            _check_choice(f"benchmark.backends[{i}]", name, tuple(BACKENDS))
        if len(set(self.backends)) != len(self.backends):
            _fail("benchmark.backends", f"lists a backend twice: {list(self.backends)}")
        for key in ("prompt_lengths", "batch_sizes"):
            values = getattr(self, key)
            if not values:
                _fail(f"benchmark.{key}", "must not be empty")
            for i, v in enumerate(values):
                _check_positive(f"benchmark.{key}[{i}]", v)
        # TPOT is (E2E - TTFT) / (N - 1): it needs at least two output tokens.
        _check_positive("benchmark.output_length", self.output_length, 2)
        _check_positive("benchmark.warmup_runs", self.warmup_runs, 0)
        _check_positive("benchmark.measured_runs", self.measured_runs, 1)
        _check_seed("benchmark.seed", self.seed)
        _check_choice("benchmark.compile", self.compile, ("auto", "inductor", "eager"))
        if not isinstance(self.compile_prefill, bool):
            _fail("benchmark.compile_prefill", f"must be true or false; got {self.compile_prefill!r}")


SERVING_DATASETS = ("random", "sharegpt")
SLO_METRICS = ("ttft_ms", "tpot_ms", "e2el_ms")  # per-request values a serving SLO can bound (vLLM --goodput)


@dataclass
class ServingConfig:
    """Stage `serve`: requests arriving under load (pipeline/benchmark/serving.py, workload.py)."""

    backends: list[str] = field(default_factory=lambda: ["torch", "torch-compiled"])
    dataset: str = "random"            # random ids | sharegpt (a local ShareGPT-format JSON file)
    dataset_path: Optional[str] = None
    input_len: int = 128               # random: prompt tokens (mean when range_ratio > 0)
    output_len: int = 128              # random: output tokens, generated exactly (EOS ignored)
    range_ratio: float = 0.0           # random: lengths uniform in [len * (1 - r), len * (1 + r)]
    sharegpt_output_len: Optional[int] = None  # sharegpt: null = the reply's token count
    num_requests: int = 64             # per load point
    warmup_requests: int = 4           # sent all at once before the first point, not recorded
    request_rates: list[float] = field(default_factory=lambda: [float("inf")])  # req/s, open loop; inf = all at once
    concurrencies: list[int] = field(default_factory=list)  # closed loop: clients each with one request in flight
    burstiness: float = 1.0            # gamma shape of the arrival gaps; 1 = Poisson
    max_num_seqs: int = 256            # KV-cache slots (sequences in flight)
    max_num_batched_tokens: int = 8192  # prompt tokens one prefill iteration may take
    slot_buckets: list[int] = field(default_factory=list)  # decode batch sizes compiled; [] = powers of two
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 95.0, 99.0])
    # Per-request bounds (ms) goodput counts against. Empty by default: OmegaConf merges dicts key by key, so a
    # default here could never be removed by params.yaml; conf/serving/*.yaml sets {ttft_ms: 200, tpot_ms: 50}.
    slo: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    timeout_s: float = 1800.0  # per backend (load, compile, every load point); past it the worker is stopped, failed

    def validate(self) -> None:
        _check_timeout("serving.timeout_s", self.timeout_s)
        for i, name in enumerate(self.backends):
            _check_choice(f"serving.backends[{i}]", name, tuple(BACKENDS))
        if len(set(self.backends)) != len(self.backends):
            _fail("serving.backends", f"lists a backend twice: {list(self.backends)}")
        _check_choice("serving.dataset", self.dataset, SERVING_DATASETS)
        if self.dataset == "sharegpt" and not self.dataset_path:
            _fail("serving.dataset_path", "is required when serving.dataset=sharegpt (a ShareGPT-format JSON file)")
        for key in ("input_len", "output_len", "num_requests", "max_num_seqs", "max_num_batched_tokens"):
            _check_finite_positive(f"serving.{key}", getattr(self, key))
        _check_positive("serving.warmup_requests", self.warmup_requests, 0)
        _check_seed("serving.seed", self.seed)
        if self.sharegpt_output_len is not None:
            _check_finite_positive("serving.sharegpt_output_len", self.sharegpt_output_len)
        if not 0 <= self.range_ratio < 1:
            _fail("serving.range_ratio", f"must be in [0, 1), got {self.range_ratio}")
        if not self.request_rates and not self.concurrencies:
            _fail("serving.request_rates", "and serving.concurrencies are both empty; give at least one load point")
        for i, rate in enumerate(self.request_rates):
            if not rate > 0:  # NaN fails this too
                _fail(f"serving.request_rates[{i}]", f"must be > 0 requests/s (inf = all at once), got {rate}")
        for i, c in enumerate(self.concurrencies):
            _check_positive(f"serving.concurrencies[{i}]", c)
        if not (0 < self.burstiness < float("inf")):
            _fail("serving.burstiness", f"must be > 0 and finite (1 = Poisson), got {self.burstiness}")
        for i, b in enumerate(self.slot_buckets):
            if not 1 <= b <= self.max_num_seqs:
                _fail(f"serving.slot_buckets[{i}]", f"must be in [1, serving.max_num_seqs={self.max_num_seqs}], got {b}")
        for i, p in enumerate(self.percentiles):
            if not 0 < p <= 100:
                _fail(f"serving.percentiles[{i}]", f"must be in (0, 100], got {p}")
        for name, bound in self.slo.items():
            if name not in SLO_METRICS:
                close = difflib.get_close_matches(name, SLO_METRICS, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                _fail(f"serving.slo.{name}", f"is not a metric an SLO can bound ({', '.join(SLO_METRICS)}){hint}")
            if not 0 < bound < float("inf"):
                _fail(f"serving.slo.{name}", f"must be > 0 ms and finite, got {bound}")

    @property
    def longest_request(self) -> int:
        """Prompt + output positions of the longest random request (sharegpt: checked per request)."""
        return round(self.input_len * (1 + self.range_ratio)) + round(self.output_len * (1 + self.range_ratio))


@dataclass
class ExportConfig:
    """Stage export_onnx (torch.onnx.export, dynamo) -> artifacts/onnx/model.onnx with KV cache."""

    opset: int = 18
    # The stage fails when ONNX and torch logits differ by more; null = the fp32 tolerance of the precision
    # table (pipeline/precision.py).
    parity_atol: Optional[float] = None
    ort_optimization: str = "all"  # level whose node counts are recorded next to the raw graph's
    attn_implementation: str = "sdpa"
    # Stage export_onnx_half: the same graph in fp16 or bf16 (what TensorRT builds fp16/bf16 engines from, since a
    # strongly typed network takes its precision from the graph); null = not exported.
    half: Optional[str] = "fp16"
    half_min_top1: float = 0.95   # the half graph's top-1 agreement with Hugging Face fp32 must reach this

    def validate(self) -> None:
        _check_positive("export.opset", self.opset, 18)
        if self.half is not None:
            _check_choice("export.half", self.half, ("fp16", "bf16"))
        if not 0 <= self.half_min_top1 <= 1:
            _fail("export.half_min_top1", f"must be in [0, 1], got {self.half_min_top1}")
        if self.parity_atol is not None and not self.parity_atol > 0:
            _fail("export.parity_atol", f"must be > 0 or null, got {self.parity_atol}")

        _check_choice("export.ort_optimization", self.ort_optimization, ("basic", "extended", "all"))
        _check_choice("export.attn_implementation", self.attn_implementation, ("sdpa", "eager"))

    @property
    def atol(self) -> float:
        """The export is fp32: export.parity_atol, else the precision table's fp32 tolerance."""
        return self.parity_atol if self.parity_atol is not None else PRECISIONS["fp32"].logits_atol


@dataclass
class CalibrationConfig:
    """Stage calibrate: onnxruntime static INT8 (QDQ, per-channel symmetric weights, symmetric activations)."""

    method: str = "minmax"
    num_samples: int = 16
    seq_len: int = 32
    batch_size: int = 1
    seed: int = 0
    op_types: list[str] = field(default_factory=lambda: ["MatMul"])
    nodes_to_exclude: list[str] = field(default_factory=list)
    quantize_outputs: bool = False
    weight_matmuls_only: bool = False
    percentile: float = 99.999
    smoothquant_alpha: Optional[float] = None
    dataset: Optional[str] = None  # a Hugging Face `datasets` name; null = the embedded corpus
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    text_column: str = "text"

    def validate(self) -> None:
        _check_choice("calibration.method", self.method, CALIBRATION_METHODS)
        _check_seed("calibration.seed", self.seed)
        for key in ("num_samples", "seq_len", "batch_size"):
            _check_positive(f"calibration.{key}", getattr(self, key))
        if not self.op_types:
            _fail("calibration.op_types", "must name at least one op type (MatMul is the tested choice)")
        try:
            from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        except ImportError:  # the calibrate stage says what is missing
            allowed = None
        else:
            allowed = tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))
        for i, op in enumerate(self.op_types):
            if allowed is not None:
                _check_choice(f"calibration.op_types[{i}]", op, allowed)
        if not 0 < self.percentile <= 100:
            _fail("calibration.percentile", f"must be in (0, 100], got {self.percentile}")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            _fail("calibration.smoothquant_alpha", f"must be in [0, 1] or null, got {self.smoothquant_alpha}")


@dataclass
class GateConfig:
    max_ppl_delta_pct: float = 3.0
    min_top1: float = 0.95
    mode: str = "warn"  # off | warn | fail


@dataclass
class EvaluateConfig:
    """Stage evaluate: every artifact vs the Hugging Face fp32 reference on held-out text."""

    seq_len: int = 64
    max_sequences: Optional[int] = None
    torch_precisions: list[str] = field(
        default_factory=lambda: ["fp32", "fp16", "bf16", "int8-wo", "fp8-wo", "fp8"])
    gate: GateConfig = field(default_factory=GateConfig)

    def validate(self) -> None:
        _check_positive("evaluate.seq_len", self.seq_len, 2)
        if self.max_sequences is not None:
            _check_positive("evaluate.max_sequences", self.max_sequences)
        if "fp32" not in self.torch_precisions:
            _fail("evaluate.torch_precisions", "must include fp32 (the reference)")
        # Float precisions run Hugging Face's model; the weight-quantized ones the project's Llama on CPU
        # (pipeline/model/quant.py: torch >= 2.11 CPU runs all three).
        from pipeline.precision import WEIGHT_QUANT_PRECISIONS

        for i, p in enumerate(self.torch_precisions):
            _check_choice(f"evaluate.torch_precisions[{i}]", p, FLOAT_PRECISIONS + WEIGHT_QUANT_PRECISIONS)
        if self.gate.max_ppl_delta_pct < 0:
            _fail("evaluate.gate.max_ppl_delta_pct", f"must be >= 0, got {self.gate.max_ppl_delta_pct}")
        if not 0 <= self.gate.min_top1 <= 1:
            _fail("evaluate.gate.min_top1", f"must be in [0, 1], got {self.gate.min_top1}")
        _check_choice("evaluate.gate.mode", self.gate.mode, ("off", "warn", "fail"))


@dataclass
class ConvertConfig:
    """FasterTransformer / TensorRT-LLM checkpoint conversion (stages convert_ft, convert_trtllm)."""

    formats: list[str] = field(default_factory=lambda: ["ft", "trtllm"])
    dtype: Optional[str] = None  # null = precision.name
    ft_int8_mode: int = 0  # 1 = FasterTransformer weight-only INT8 (quantized by FT at load time)
    trtllm_quant: Optional[str] = None  # null | W8A16 (needs tensorrt_llm installed)

    def validate(self) -> None:
        for i, name in enumerate(self.formats):
            _check_choice(f"convert.formats[{i}]", name, tuple(CHECKPOINT_FORMATS))
        if self.dtype is not None:
            _check_choice("convert.dtype", self.dtype, FLOAT_PRECISIONS)
        _check_choice("convert.ft_int8_mode", self.ft_int8_mode, (0, 1))
        if self.trtllm_quant is not None:
            _check_choice("convert.trtllm_quant", self.trtllm_quant, ("W8A16",))

    def resolved_dtype(self, precision: "PrecisionConfig") -> str:
        return self.dtype or (precision.name if precision.name in FLOAT_PRECISIONS else "fp32")


@dataclass
class VerifyConfig:
    """Stage verify_parallel: the TP x PP runner on the converted checkpoints vs Hugging Face fp32."""

    num_prompts: int = 2
    prompt_length: int = 12
    max_new_tokens: int = 8
    seed: int = 0
    # Gate on logits for fp32 checkpoints (lower precisions are gated on top-1 only); null = the fp32
    # tolerance of the precision table (pipeline/precision.py).
    max_abs_diff: Optional[float] = None
    min_top1: float = 0.95
    on_fail: str = "error"  # error | warn
    timeout_s: float = 600.0

    def validate(self) -> None:
        for key in ("num_prompts", "prompt_length", "max_new_tokens"):
            _check_positive(f"verify.{key}", getattr(self, key))
        _check_seed("verify.seed", self.seed)
        if self.max_abs_diff is not None and not self.max_abs_diff > 0:
            _fail("verify.max_abs_diff", f"must be > 0 or null, got {self.max_abs_diff}")

        if not 0 <= self.min_top1 <= 1:
            _fail("verify.min_top1", f"must be in [0, 1], got {self.min_top1}")
        _check_choice("verify.on_fail", self.on_fail, ("error", "warn"))
        _check_timeout("verify.timeout_s", self.timeout_s)

    def atol(self, dtype: str) -> float | None:
        """Logits gate for a checkpoint of `dtype`: verify.max_abs_diff for fp32 when set, else the precision
        table's tolerance (None: gated on top-1 agreement only)."""
        if dtype == "fp32" and self.max_abs_diff is not None:
            return self.max_abs_diff
        return PRECISIONS[dtype].logits_atol


# TensorRT's ProfilingVerbosity / HardwareCompatibilityLevel members, in lower case (trt_build upper-cases them).
PROFILING_VERBOSITIES = ("detailed", "layer_names_only", "none")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")


@dataclass
class TensorRTConfig:
    """Stage build_engine (TensorRT >= 10.12 or 11, strongly typed) and backend tensorrt. The stage builds when
    benchmark.backends or serving.backends names `tensorrt`, and records that it was not asked otherwise."""

    workspace_gib: float = 4.0         # memory pool limit for tactics (WORKSPACE)
    optimization_level: int = 3        # builder_optimization_level, 0-5: higher = longer build, faster engine
    # One optimization profile per entry, [min, opt, max] per dim: batch, seq (new tokens), past (cached tokens).
    # The backend picks, per call, the first profile whose ranges hold the call's shapes.
    profiles: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    timing_cache: bool = True          # keep and reuse artifacts/trt_timing_cache (per GPU and TensorRT version)
    profiling_verbosity: str = "detailed"  # detailed: the inspector's layer JSON shows tactics and fusions
    tf32: bool = True                  # fp32 layers may use TF32 tensor cores (the one precision flag TensorRT 11 keeps)
    refit: bool = False                # weights refittable (BuilderFlag.REFIT)
    strip_plan: bool = False           # weights left out of the plan, refit from the ONNX at load (needs refit)
    weight_streaming: bool = False     # weights stay in host memory, streamed to the GPU
    weight_streaming_budget_gib: Optional[float] = None  # device budget for streamed weights; null = automatic
    max_aux_streams: Optional[int] = None
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability

    def validate(self) -> None:
        if not self.workspace_gib > 0:
            _fail("tensorrt.workspace_gib", f"must be > 0, got {self.workspace_gib}")
        _check_choice("tensorrt.optimization_level", self.optimization_level, tuple(range(6)))
        for name, dims in self.profiles.items():
            if set(dims) != set(ENGINE_DIMS):
                _fail(f"tensorrt.profiles.{name}", f"must give exactly {', '.join(ENGINE_DIMS)}; got {sorted(dims)}")
            for dim in ENGINE_DIMS:
                r = dims[dim]
                low = 0 if dim == "past" else 1
                if len(r) != 3 or not all(isinstance(v, int) for v in r) or not low <= r[0] <= r[1] <= r[2]:
                    _fail(f"tensorrt.profiles.{name}.{dim}", f"must be [min, opt, max] integers with {low} <= min "
                          f"<= opt <= max; got {r}")
        _check_choice("tensorrt.profiling_verbosity", self.profiling_verbosity, PROFILING_VERBOSITIES)
        _check_choice("tensorrt.hardware_compatibility", self.hardware_compatibility, HARDWARE_COMPATIBILITY)
        if self.strip_plan and not self.refit:
            _fail("tensorrt.strip_plan", "needs tensorrt.refit=true (a stripped plan gets its weights by refit)")
        if self.weight_streaming_budget_gib is not None:
            if not self.weight_streaming:
                _fail("tensorrt.weight_streaming_budget_gib", "is set but tensorrt.weight_streaming is false")
            if not self.weight_streaming_budget_gib > 0:
                _fail("tensorrt.weight_streaming_budget_gib", f"must be > 0 or null, got {self.weight_streaming_budget_gib}")
        if self.max_aux_streams is not None:
            _check_positive("tensorrt.max_aux_streams", self.max_aux_streams, 0)


TRTLLM_KV_CACHE_TYPES = ("paged", "continuous")
TRTLLM_SWITCHES = ("enable", "disable")


@dataclass
class TrtllmBuildConfig:
    """trtllm-build arguments (stage build_trtllm_engine, TensorRT-LLM <= 1.2). Plugin switches are enable/disable."""

    max_batch_size: int = 256
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 8192
    kv_cache_type: str = "paged"
    gpt_attention_plugin: str = "auto"
    gemm_plugin: str = "auto"
    use_paged_context_fmha: str = "enable"
    multiple_profiles: str = "enable"
    use_fused_mlp: str = "enable"
    tokens_per_block: int = 32
    workers: int = 1
    profiling_verbosity: str = "detailed"

    def validate(self) -> None:
        for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block", "workers"):
            _check_positive(f"trtllm.build.{key}", getattr(self, key))
        if self.max_input_len > self.max_seq_len:
            _fail("trtllm.build.max_input_len", f"exceeds trtllm.build.max_seq_len={self.max_seq_len}")
        _check_choice("trtllm.build.kv_cache_type", self.kv_cache_type, TRTLLM_KV_CACHE_TYPES)
        for key in ("use_paged_context_fmha", "multiple_profiles", "use_fused_mlp"):
            _check_choice(f"trtllm.build.{key}", getattr(self, key), TRTLLM_SWITCHES)
        _check_choice("trtllm.build.profiling_verbosity", self.profiling_verbosity, PROFILING_VERBOSITIES)


@dataclass
class TrtllmConfig:
    """Backends tensorrt-llm (the LLM API's PyTorch flow on artifacts/weights, parallel.tp x parallel.pp) and
    tensorrt-llm-engine (an engine from build_trtllm_engine, TensorRT-LLM <= 1.2). Runtime settings shared by both."""

    free_gpu_memory_fraction: float = 0.9  # KvCacheConfig: share of free memory given to the paged KV cache
    enable_block_reuse: bool = False        # KV prefix reuse; off so repeated benchmark prompts are not cached
    max_batch_size: int = 256               # requests scheduled per iteration (serving.max_num_seqs caps it)
    max_num_tokens: int = 8192              # tokens per iteration (serving.max_num_batched_tokens caps it)
    cuda_graphs: bool = True                # PyTorch flow: CUDA graphs for decode, padded to captured sizes
    cuda_graph_max_batch_size: int = 256
    build: TrtllmBuildConfig = field(default_factory=TrtllmBuildConfig)

    def validate(self) -> None:
        if not 0 < self.free_gpu_memory_fraction < 1:
            _fail("trtllm.free_gpu_memory_fraction", f"must be in (0, 1), got {self.free_gpu_memory_fraction}")
        for key in ("max_batch_size", "max_num_tokens", "cuda_graph_max_batch_size"):
            _check_positive(f"trtllm.{key}", getattr(self, key))
        self.build.validate()


@dataclass
class HardwareConfig:
    """Where the benchmark runs, and the figures its roofline divides by (pipeline/benchmark/roofline.py)."""

    device: str = "cpu"
    num_threads: int = 0
    name: Optional[str] = None  # e.g. "NVIDIA H100 SXM 80GB"; recorded with the figures
    # true: the benchmark measures copy bandwidth and matmul peak on the spot; false: the figures below.
    measure: bool = True
    memory_bandwidth_gbs: Optional[float] = None  # GB/s (1e9 B/s)
    peak_tflops: dict[str, float] = field(default_factory=dict)  # dense TFLOP/s (TOP/s for int8) per dtype
    # What the machine costs per hour (any currency): `python -m pipeline advise` turns goodput into cost per
    # million output tokens with it; null = no cost column.
    price_per_hour: Optional[float] = None
    PEAK_DTYPES = ("fp32", "fp16", "bf16", "fp8", "int8")  # roofline.peak_dtype() names

    def validate(self) -> None:
        _check_choice("hardware.device", self.device, DEVICES)
        _check_positive("hardware.num_threads", self.num_threads, 0)
        if self.memory_bandwidth_gbs is not None and not self.memory_bandwidth_gbs > 0:
            _fail("hardware.memory_bandwidth_gbs", f"must be > 0 or null, got {self.memory_bandwidth_gbs}")
        for dtype, tflops in self.peak_tflops.items():
            if dtype not in self.PEAK_DTYPES:
                _fail(f"hardware.peak_tflops.{dtype}", f"is not a known dtype ({', '.join(self.PEAK_DTYPES)})")
            if not tflops > 0:
                _fail(f"hardware.peak_tflops.{dtype}", f"must be > 0, got {tflops}")
        if self.price_per_hour is not None and not 0 < self.price_per_hour < float("inf"):
            _fail("hardware.price_per_hour", f"must be > 0 or null, got {self.price_per_hour}")
        if not self.measure and (self.memory_bandwidth_gbs is None or not self.peak_tflops):
            _fail("hardware.measure", "is false but hardware.memory_bandwidth_gbs or hardware.peak_tflops is not "
                  "set; give the published figures or set hardware.measure=true")


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "llama3-inference"
    uri: Optional[str] = None
    timeout_s: float = 5.0

    def validate(self) -> None:
        if not self.experiment:
            _fail("tracking.experiment", "must be a non-empty experiment name")
        _check_timeout("tracking.timeout_s", self.timeout_s)


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    trtllm: TrtllmConfig = field(default_factory=TrtllmConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self._check_no_credentials()
        for section in (self.model, self.precision, self.parallel, self.benchmark, self.serving, self.export, self.calibration,
                        self.evaluate, self.convert, self.verify, self.tensorrt, self.trtllm, self.hardware,
                        self.tracking):
            section.validate()
        if self.model.rope_scaling is not None:
            self.model.rope_scaling.validate()
        m = self.model
        try:
            check_layout(self.parallel.tp, self.parallel.pp, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                         num_layers=m.num_layers, intermediate_size=m.intermediate_size, formats=self.convert.formats)
        except PipelineError as e:
            raise ConfigError(str(e)) from None
        self._check_backends()
        if self.model.max_position_embeddings and self.calibration.seq_len + 1 > self.model.max_position_embeddings:
            _fail("calibration.seq_len", f"(+1 decode step) exceeds model.max_position_embeddings="
                  f"{self.model.max_position_embeddings}, got {self.calibration.seq_len}")
        if self.model.max_position_embeddings and self.evaluate.seq_len > self.model.max_position_embeddings:
            _fail("evaluate.seq_len", f"exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
        if self.verify.prompt_length + self.verify.max_new_tokens > (self.model.max_position_embeddings or 1 << 30):
            _fail("verify.prompt_length", "plus verify.max_new_tokens exceed model.max_position_embeddings")
        if self.model.max_position_embeddings:
            longest = max(self.benchmark.prompt_lengths) + self.benchmark.output_length
            if longest > self.model.max_position_embeddings:
                _fail("benchmark.prompt_lengths",
                      f"plus benchmark.output_length ({longest} tokens) exceed model.max_position_embeddings="
                      f"{self.model.max_position_embeddings}")
        if self.model.max_position_embeddings and self.serving.dataset == "random" \
                and self.serving.longest_request > self.model.max_position_embeddings:
            _fail("serving.input_len", f"plus serving.output_len (up to {self.serving.longest_request} tokens with "
                  f"serving.range_ratio) exceed model.max_position_embeddings={self.model.max_position_embeddings}")
        self._check_serving_backends()
        self._check_engines()

    def wants(self, backend: str) -> bool:
        """Whether the benchmark or the serve stage is asked to run `backend` (engine stages build only then)."""
        return backend in self.benchmark.backends or backend in self.serving.backends

    def engine_not_built(self, backend: str) -> Optional[str]:
        """Why the stage building `backend`'s engine only records that it did not (None: it builds): no backend
        asks for it, or the backend cannot run precision.name on hardware.device (it would be skipped)."""
        spec = BACKENDS[backend]
        if not self.wants(backend):
            where = "benchmark.backends or serving.backends" if spec.steps else "serving.backends"
            return f"no backend asks for it (add {backend} to {where})"
        return spec.cannot_run(self.precision.name, self.hardware.device)

    def _check_engines(self) -> None:
        """Engines are built for fixed shapes: a benchmark or serving call they cannot take is rejected here."""
        if self.wants("tensorrt") and not BACKENDS["tensorrt"].cannot_run(self.precision.name, self.hardware.device):
            profiles = self.tensorrt.profiles
            if not profiles:
                _fail("tensorrt.profiles", "is empty but backend tensorrt is asked for; give at least one "
                      "{name: {batch: [min, opt, max], seq: [...], past: [...]}}")
            calls = []
            if "tensorrt" in self.benchmark.backends:
                calls += [(b, p, self.benchmark.output_length) for b in self.benchmark.batch_sizes
                          for p in self.benchmark.prompt_lengths]
            if "tensorrt" in self.serving.backends and self.serving.dataset == "random":
                longest_prompt = round(self.serving.input_len * (1 + self.serving.range_ratio))
                longest_output = round(self.serving.output_len * (1 + self.serving.range_ratio))
                calls += [(b, longest_prompt, longest_output) for b in (1, self.serving.max_num_seqs)]
            for batch, prompt, output in calls:
                missing = uncovered_calls(profiles, batch, prompt, output)
                if missing:
                    _fail("tensorrt.profiles", f"cover no call of batch {missing[0]}, {missing[1]} new and "
                          f"{missing[2]} cached tokens (batch {batch}, prompt {prompt}, output {output}); widen a "
                          f"profile's [min, opt, max]")
            if self.precision.name in ("fp16", "bf16") and self.export.half != self.precision.name:
                _fail("export.half", f"is {self.export.half} but backend tensorrt builds precision.name="
                      f"{self.precision.name} from the {self.precision.name} ONNX export; set export.half="
                      f"{self.precision.name}")
        if self.wants("tensorrt-llm-engine"):
            longest = max([max(self.benchmark.prompt_lengths) + self.benchmark.output_length]
                          + ([self.serving.longest_request] if self.serving.dataset == "random" else []))
            if longest > self.trtllm.build.max_seq_len:
                _fail("trtllm.build.max_seq_len", f"({self.trtllm.build.max_seq_len}) is below the longest request "
                      f"({longest} tokens); raise it")

    def _check_serving_backends(self) -> None:
        # A backend that cannot run this precision x device is skipped by the serve stage and recorded, as the
        # benchmark does; when none can, the stage records that and serves nothing (the DAG stays green).
        for i, name in enumerate(self.serving.backends):
            why = BACKENDS[name].cannot_serve()
            if why:
                _fail(f"serving.backends[{i}]", why)

    def _check_no_credentials(self) -> None:
        """Credentials in params.yaml would be committed with it, kept in every DVC experiment commit and, for
        the sections stages declare, in dvc.lock: they come from the environment only (errors.redact says
        what a credential looks like: URL userinfo, a token query parameter, a secret variable's value)."""
        for key, value in flatten(self.to_dict()).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and redact(item) != item:
                    _fail(key, f"holds credentials ({redact(item)}); params.yaml is committed and recorded by DVC "
                          f"experiments, so give them in the environment instead: MLFLOW_TRACKING_USERNAME and "
                          f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for tracking.uri, or the whole URI "
                          f"in MLFLOW_TRACKING_URI; HF_TOKEN for the hub")

    def _check_backends(self) -> None:
        """What the backend registry declares: a precision x device that none of benchmark.backends can run is
        rejected here, not inside the benchmark; a backend whose artifact convert.formats leaves out too.
        Backends that cannot run a precision others can (torch at int8) are skipped and recorded."""
        precision, device = self.precision.name, self.hardware.device
        for i, name in enumerate(self.benchmark.backends):
            why = BACKENDS[name].cannot_benchmark()
            if why:
                _fail(f"benchmark.backends[{i}]", why)
        problems = {name: BACKENDS[name].cannot_run(precision, device) for name in self.benchmark.backends}
        if all(problems.values()):
            runnable = [n for n, s in BACKENDS.items() if not s.cannot_run(precision, device)]
            raise ConfigError(f"benchmark.backends={list(self.benchmark.backends)}: none can run precision.name="
                              f"{precision} on hardware.device={device} ({'; '.join(problems.values())}); backends "
                              f"that can: {', '.join(runnable) or 'none'}")
        for i, name in enumerate(self.benchmark.backends):
            if problems[name]:
                continue
            art = paths.ARTIFACTS[BACKENDS[name].artifact_for(precision)]
            if art.convert_format and art.convert_format not in self.convert.formats:
                raise ConfigError(f"benchmark.backends[{i}]={name} loads {art.path} (stage {art.stage}), which "
                                  f"convert.formats={list(self.convert.formats)} does not make; add "
                                  f"{art.convert_format} to convert.formats or drop {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dataclass_dict(self, section: str) -> dict[str, Any]:
        """One params section as plain data (what engine builders and backend options take)."""
        return dataclasses.asdict(getattr(self, section))


def from_dict(raw: Any, source: str = "params.yaml") -> PipelineConfig:
    """Validate a plain dict against the schema. Errors read `<source>: <key> <problem>`."""
    if raw is None:
        raise ConfigError(f"{source}: is empty; run `python -m pipeline compose` to write it from conf/")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        _check_raw(raw, PipelineConfig, "")
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw)
        cfg = OmegaConf.to_object(merged)
        cfg.validate()
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{source}: {e.full_key} is required but not set (pass {e.full_key}=...)") from None
    except ValidationError as e:
        message = str(e).splitlines()[0]
        raise ConfigError(f"{source}: {e.full_key} has the wrong type: {message}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None


def _check_raw(raw: dict, schema: type, prefix: str) -> None:
    """Unknown keys and the type of every value, before OmegaConf merges them: OmegaConf turns 2 into true and
    5 into '5', accepts NaN and inf for any float, and words a list given for a mapping without the key."""
    hints = _hints(schema)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(unknown_key_message(dotted))
        _check_value(value, hints[key], dotted)


def check_setting(dotted: str, value: Any) -> None:
    """One setting (a Hydra override's key and value) against the schema: unknown key or wrong type."""
    hint: Any = PipelineConfig
    for part in dotted.split("."):
        if typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint) and part in _hints(hint):
            hint = _hints(hint)[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            raise ConfigError(unknown_key_message(dotted))
    _check_value(value, hint, dotted)


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _wrong_type(key: str, expected: str, value: Any) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    _fail(key, f"has the wrong type: must be {expected}, got {shown} ({type(value).__name__})")


def _check_value(value: Any, hint: Any, key: str) -> None:
    if isinstance(value, str) and (value == "???" or "${" in value):
        return  # OmegaConf's mandatory-value marker or an interpolation: the merge resolves or reports it
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if value is None:
        _fail(key, "must be set; null is not allowed here")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _wrong_type(key, "a mapping", value)
        _check_raw(value, hint, f"{key}.")
    elif origin is list:
        if not isinstance(value, list):
            _wrong_type(key, "a list", value)
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{key}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            _wrong_type(key, "a mapping", value)
        for name, item in value.items():
            _check_value(item, args[1], f"{key}.{name}")
    elif hint is bool:
        if not isinstance(value, bool):
            _wrong_type(key, "true or false", value)
    elif hint is str:
        if not isinstance(value, str):
            _wrong_type(key, "a string (quote a value that YAML would read as a number or boolean)", value)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong_type(key, "an integer", value)
        if abs(value) >= 2**63:  # past int64, torch and numpy overflow
            _fail(key, f"is out of range (it must fit in 64 bits), got {value}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _wrong_type(key, "a number", value)
        if isinstance(value, int) and abs(value) >= 2**63:
            _fail(key, f"is out of range, got {value}")
        if math.isnan(value):
            _fail(key, "must be a number, got nan")
        if math.isinf(value) and not allows_inf(key):
            _fail(key, f"must be finite, got {value}")


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Every dotted key the schema has, sections included ('model', 'model.dtype', ...)."""
    keys = []
    for f in dataclasses.fields(schema or PipelineConfig):
        keys.append(prefix + f.name)
        nested = _dataclass_type(f.type)
        if nested is not None:
            keys += schema_keys(nested, f"{prefix}{f.name}.")
    return keys


def unknown_key_message(dotted: str) -> str:
    """`unknown key 'benchmark.batch_size'; did you mean 'benchmark.batch_sizes'?`: the closest valid key among
    the siblings of the first part that does not exist, else the list of those siblings."""
    known = set(schema_keys())
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        if ".".join(parts[:depth]) not in known:
            break
    section = ".".join(parts[:depth - 1])
    siblings = [k.rsplit(".", 1)[-1] for k in schema_keys()
                if k.count(".") == depth - 1 and (not section or k.startswith(section + "."))]
    close = difflib.get_close_matches(parts[depth - 1], siblings, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{dotted}'; did you mean '{'.'.join([*parts[:depth - 1], close[0]])}'?"
    return f"unknown key '{dotted}' (allowed under '{section or '<root>'}': {', '.join(siblings)})"


def _dataclass_type(annotation: Any) -> type | None:
    # Annotations are strings under `from __future__ import annotations`.
    name = str(annotation).replace("Optional[", "").rstrip("]")
    candidate = globals().get(name)
    return candidate if dataclasses.is_dataclass(candidate) else None


def yaml_error(e: yaml.YAMLError, name: str) -> str:
    """`file:line:column: not valid YAML: problem (context)`, 1-based as editors count, from PyYAML's marks."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{mark.name if mark.name and not mark.name.startswith('<') else name}:{mark.line + 1}:{mark.column + 1}" \
        if mark is not None else name
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain data, read as OmegaConf reads conf/ (so `1e-5` is a number and a duplicate key is an
    error, not silently the last value); every failure is one ConfigError line naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not text.strip():
        return None
    try:
        data = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(e, str(path))) from None
    except OSError:  # OmegaConf refuses a document that is a bare number or boolean
        raise ConfigError(f"{path}: expected a mapping at the top level") from None
    return OmegaConf.to_container(data, resolve=False)


def load(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read and validate params.yaml. Stages call this first, before touching any output."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `python -m pipeline compose` to write it from conf/")
    return from_dict(read_yaml(path), source=str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values (they are logged as strings)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out
