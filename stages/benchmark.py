"""Stage `benchmark`: every configured backend in its own process -> metrics JSON + per-run CSV."""

from pipeline import artifacts, config, paths, tracking
from pipeline.benchmark import launcher, results
from stages._main import run


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("benchmark", cfg) as stage:
        weights = artifacts.verify_manifest(paths.WEIGHTS_DIR)
        vocab_size = artifacts.manifest_field(paths.WEIGHTS_DIR, weights, "shape.vocab_size")
        raw, plan = launcher.run_all(cfg, vocab_size=vocab_size)
        metrics = results.write_results(raw, paths.BENCHMARK_METRICS, paths.BENCHMARK_CONDITIONS,
                                        paths.BENCHMARK_RUNS, plan.skipped, plan.parallel, plan.failed)
        stage.log_metrics(metrics)
        for path in (paths.BENCHMARK_METRICS, paths.BENCHMARK_CONDITIONS, paths.BENCHMARK_RUNS):
            stage.log_artifact(path, "benchmark")
        stage.set_tags({"backends": ",".join(cfg.benchmark.backends), "model": cfg.model.name,
                        **({"failed_backends": ",".join(plan.failed)} if plan.failed else {})})


if __name__ == "__main__":
    run(main)
