"""Stage `report`: markdown summary + PNG plots from the metrics files, also logged to MLflow."""

from pipeline import config, paths, report, tracking
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("report", cfg) as stage:
        built = report.build(paths.BENCHMARK_METRICS, paths.BENCHMARK_CONDITIONS, paths.BENCHMARK_RUNS,
                             paths.WEIGHTS_METRICS, paths.WEIGHTS_DIR, paths.REPORT_DIR, paths.VERIFY_METRICS)
        for name in built["files"]:
            stage.log_artifact(paths.REPORT_DIR / name, "report")


if __name__ == "__main__":
    run(main)
