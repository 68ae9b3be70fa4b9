"""Stage `verify_parallel`: the TP x PP torch runner on both converted checkpoints vs Hugging Face fp32."""

from pipeline import config, paths, tracking
from pipeline.artifacts import atomic_write_json
from pipeline.verify_parallel import verify_all
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("verify_parallel", cfg) as stage:
        metrics = verify_all(cfg, paths.WEIGHTS_DIR, {"ft": paths.FT_DIR, "trtllm": paths.TRTLLM_DIR})
        atomic_write_json(paths.VERIFY_METRICS, metrics)
        stage.log_metrics(metrics)
        stage.log_artifact(paths.VERIFY_METRICS, "verify_parallel")
        stage.set_tags({"tp": cfg.parallel.tp, "pp": cfg.parallel.pp})


if __name__ == "__main__":
    run(main)
