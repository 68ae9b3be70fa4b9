"""Stage `export_onnx`: HF weights -> artifacts/onnx/model.onnx (decoder with KV cache), checked against torch."""

from pipeline import artifacts, config, paths, tracking
from pipeline.artifacts import atomic_write_json
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("export_onnx", cfg) as stage:
        artifacts.verify_manifest(paths.WEIGHTS_DIR)
        import time

        from pipeline.export import export_onnx

        t0 = time.perf_counter()
        manifest = export_onnx(paths.WEIGHTS_DIR, paths.ONNX_DIR, opset=cfg.export.opset,
                               parity_atol=cfg.export.atol, ort_optimization=cfg.export.ort_optimization,
                               attn_implementation=cfg.export.attn_implementation)
        metrics = {**manifest["metrics"], "stage_s": round(time.perf_counter() - t0, 2)}
        atomic_write_json(paths.EXPORT_METRICS, metrics)
        atomic_write_json(paths.ONNX_GRAPH, manifest["graph"])
        stage.log_metrics(metrics)
        stage.log_manifest(paths.ONNX_DIR)
        stage.log_artifact(paths.ONNX_GRAPH, "export_onnx")


if __name__ == "__main__":
    run(main)
