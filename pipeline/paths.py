"""Output locations, relative to the project root. dvc.yaml declares the same paths
(tests/test_dvc_yaml.py keeps the two in step)."""

from pathlib import Path
from typing import NamedTuple, Optional

PARAMS = Path("params.yaml")
WEIGHTS_DIR = Path("artifacts/weights")
WEIGHTS_METRICS = Path("metrics/weights.json")
BENCHMARK_METRICS = Path("metrics/benchmark.json")
BENCHMARK_CONDITIONS = Path("metrics/benchmark_conditions.json")
BENCHMARK_RUNS = Path("plots/benchmark_runs.csv")
SERVING_METRICS = Path("metrics/serving.json")
SERVING_CONDITIONS = Path("metrics/serving_conditions.json")
SERVING_RECORDS = Path("metrics/serving_requests.jsonl")  # one line per request: every token's time
REPORT_DIR = Path("reports")
FT_DIR = Path("artifacts/ft")
TRTLLM_DIR = Path("artifacts/trtllm")
VERIFY_METRICS = Path("metrics/verify_parallel.json")
ONNX_DIR = Path("artifacts/onnx")
ONNX_HALF_DIR = Path("artifacts/onnx_half")     # the fp16 or bf16 export (export.half) TensorRT builds from
EXPORT_HALF_METRICS = Path("metrics/export_onnx_half.json")
ENGINE_DIR = Path("artifacts/trt_engine")
TIMING_CACHE_DIR = Path("artifacts/trt_timing_cache")  # persisted DVC output: one file per GPU x TensorRT version
ENGINE_METRICS = Path("metrics/build_engine.json")
ENGINE_LOG = Path("metrics/build_engine.log")      # every TensorRT message of the last build, kept when it fails
TRTLLM_ENGINE_DIR = Path("artifacts/trtllm_engine")
TRTLLM_ENGINE_METRICS = Path("metrics/build_trtllm_engine.json")
TRTLLM_ENGINE_LOG = Path("metrics/build_trtllm_engine.log")
INT8_DIR = Path("artifacts/onnx_int8")
EXPORT_METRICS = Path("metrics/export_onnx.json")
ONNX_GRAPH = Path("metrics/onnx_graph.json")
CALIBRATE_METRICS = Path("metrics/calibrate.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
HEADLINE_METRICS = Path("metrics/headline.json")       # the short file `dvc exp show` shows
REPORT_PLOT_DATA = Path("plots/backend_scenarios.json")  # `dvc plots` data: one row per backend x scenario


class Artifact(NamedTuple):
    path: Path
    stage: str                        # the stage that writes it (named in "run dvc repro <stage>" hints)
    convert_format: Optional[str] = None  # the convert.formats entry that must be on for it to exist


# What a backend can load (pipeline/backends/registry.py declares which): a directory with manifest.json.
ARTIFACTS = {
    "hf_weights": Artifact(WEIGHTS_DIR, "weights"),        # config.json, *.safetensors, tokenizer
    "onnx": Artifact(ONNX_DIR, "export_onnx"),             # fp32 ONNX decoder with KV cache (model.onnx)
    "onnx_int8": Artifact(INT8_DIR, "calibrate"),          # INT8 QDQ ONNX decoder (model.onnx)
    "onnx_half": Artifact(ONNX_HALF_DIR, "export_onnx_half"),  # fp16/bf16 ONNX decoder (model.onnx)
    "trt_engine": Artifact(ENGINE_DIR, "build_engine"),     # TensorRT plan (model.plan) + layer JSON
    "trtllm_engine": Artifact(TRTLLM_ENGINE_DIR, "build_trtllm_engine", "trtllm"),  # trtllm-build output
    "ft_checkpoint": Artifact(FT_DIR, "convert_ft", "ft"),
    "trtllm_checkpoint": Artifact(TRTLLM_DIR, "convert_trtllm", "trtllm"),
}
