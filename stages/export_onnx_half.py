"""Stage `export_onnx_half`: HF weights -> artifacts/onnx_half/model.onnx in export.half (fp16 | bf16), checked
against Hugging Face fp32; with export.half null it records that no half graph was asked for."""

from pipeline import artifacts, config, paths, tracking
from pipeline.artifacts import atomic_write_json
from pipeline.convert import skip
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("export_onnx_half", cfg) as stage:
        if cfg.export.half is None:
            skip.write_skipped(paths.ONNX_HALF_DIR, "onnx-half", "export.half is null", kind="onnx-model")
            atomic_write_json(paths.EXPORT_HALF_METRICS, {"skipped": True})
            return
        artifacts.verify_manifest(paths.WEIGHTS_DIR)
        import time

        from pipeline.export import export_half

        t0 = time.perf_counter()
        manifest = export_half(paths.WEIGHTS_DIR, paths.ONNX_HALF_DIR, cfg.export.half, opset=cfg.export.opset,
                               min_top1=cfg.export.half_min_top1, attn_implementation=cfg.export.attn_implementation)
        metrics = {**manifest["metrics"], "stage_s": round(time.perf_counter() - t0, 2)}
        atomic_write_json(paths.EXPORT_HALF_METRICS, metrics)
        stage.log_metrics(metrics)
        stage.log_manifest(paths.ONNX_HALF_DIR)
        stage.set_tags({"dtype": cfg.export.half})


if __name__ == "__main__":
    run(main)
