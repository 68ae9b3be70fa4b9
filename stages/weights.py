"""Stage `weights`: random-init preset, local directory or hub snapshot -> artifacts/weights/."""

import time

from pipeline import config, paths, tracking, weights
from pipeline.artifacts import atomic_write_json
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("weights", cfg) as stage:
        t0 = time.perf_counter()
        manifest = weights.build(cfg.model, paths.WEIGHTS_DIR)
        metrics = {"parameter_count": manifest["parameter_count"],
                   "bytes": sum(f["bytes"] for f in manifest["files"]),
                   "seconds": round(time.perf_counter() - t0, 3)}
        atomic_write_json(paths.WEIGHTS_METRICS, metrics)
        stage.log_metrics(metrics)
        stage.log_manifest(paths.WEIGHTS_DIR)
        stage.set_tags({"model": cfg.model.name, "model.source": cfg.model.source})


if __name__ == "__main__":
    run(main)
