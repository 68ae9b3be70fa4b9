"""Stage `calibrate`: artifacts/onnx -> artifacts/onnx_int8 (QDQ model + calibration.json)."""

import dataclasses

from pipeline import artifacts, config, paths, tracking
from pipeline.artifacts import atomic_write_json
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("calibrate", cfg) as stage:
        for read in (paths.ONNX_DIR, paths.WEIGHTS_DIR):
            artifacts.verify_manifest(read)
        from pipeline.calibrate import quantize

        manifest = quantize(paths.ONNX_DIR / "model.onnx", paths.WEIGHTS_DIR, paths.INT8_DIR,
                            **dataclasses.asdict(cfg.calibration))
        atomic_write_json(paths.CALIBRATE_METRICS, manifest["metrics"])
        stage.log_metrics(manifest["metrics"])
        stage.log_manifest(paths.INT8_DIR)
        stage.log_artifact(paths.INT8_DIR / "calibration.json", "calibrate")
        stage.set_tags({"calibration.method": cfg.calibration.method})


if __name__ == "__main__":
    run(main)
