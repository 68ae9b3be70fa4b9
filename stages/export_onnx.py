"""Stage `export_onnx`: HF weights -> artifacts/onnx/model.onnx (decoder with KV cache), checked against torch."""

from pipeline import config, paths, tracking
from pipeline.artifacts import atomic_write_json
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("export_onnx", cfg) as stage:
        from pipeline.export import export_onnx

        manifest = export_onnx(paths.WEIGHTS_DIR, paths.ONNX_DIR, opset=cfg.export.opset,
                               parity_atol=cfg.export.parity_atol, ort_optimization=cfg.export.ort_optimization,
                               attn_implementation=cfg.export.attn_implementation)
        atomic_write_json(paths.EXPORT_METRICS, manifest["metrics"])
        atomic_write_json(paths.ONNX_GRAPH, manifest["graph"])
        stage.log_metrics(manifest["metrics"])
        stage.log_manifest(paths.ONNX_DIR)
        stage.log_artifact(paths.ONNX_GRAPH, "export_onnx")


if __name__ == "__main__":
    run(main)
