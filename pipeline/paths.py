"""Output locations, relative to the project root. dvc.yaml declares the same paths
(tests/test_dvc_yaml.py keeps the two in step)."""

from pathlib import Path

PARAMS = Path("params.yaml")
WEIGHTS_DIR = Path("artifacts/weights")
WEIGHTS_METRICS = Path("metrics/weights.json")
BENCHMARK_METRICS = Path("metrics/benchmark.json")
BENCHMARK_CONDITIONS = Path("metrics/benchmark_conditions.json")
BENCHMARK_RUNS = Path("plots/benchmark_runs.csv")
REPORT_DIR = Path("reports")
FT_DIR = Path("artifacts/ft")
TRTLLM_DIR = Path("artifacts/trtllm")
VERIFY_METRICS = Path("metrics/verify_parallel.json")
ONNX_DIR = Path("artifacts/onnx")
INT8_DIR = Path("artifacts/onnx_int8")
EXPORT_METRICS = Path("metrics/export_onnx.json")
ONNX_GRAPH = Path("metrics/onnx_graph.json")
CALIBRATE_METRICS = Path("metrics/calibrate.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
