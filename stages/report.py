"""Stage `report`: markdown + PNG plots, metrics/headline.json and the `dvc plots` data from the metrics
files; the report and headline are also logged to MLflow."""

from pipeline import config, paths, report, tracking
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("report", cfg) as stage:
        inputs = report.ReportInputs(
            benchmark=paths.BENCHMARK_METRICS, conditions=paths.BENCHMARK_CONDITIONS, runs=paths.BENCHMARK_RUNS,
            weights_metrics=paths.WEIGHTS_METRICS, weights_dir=paths.WEIGHTS_DIR, verify=paths.VERIFY_METRICS,
            export=paths.EXPORT_METRICS, graph=paths.ONNX_GRAPH, calibrate=paths.CALIBRATE_METRICS,
            evaluate=paths.EVALUATE_METRICS, serving=paths.SERVING_METRICS)
        built = report.build(inputs, paths.REPORT_DIR, headline_path=paths.HEADLINE_METRICS,
                             plot_data_path=paths.REPORT_PLOT_DATA)
        stage.log_metrics(built["headline"])
        for name in built["files"]:
            stage.log_artifact(paths.REPORT_DIR / name, "report")
        stage.log_artifact(paths.HEADLINE_METRICS, "report")


if __name__ == "__main__":
    run(main)
