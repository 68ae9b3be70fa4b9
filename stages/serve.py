"""Stage `serve`: the serving benchmark. Requests arrive under each load point of serving.request_rates and
serving.concurrencies; every backend of serving.backends serves them in its own process -> metrics/serving.json
(one row per backend x load point), metrics/serving_conditions.json, metrics/serving_requests.jsonl."""

from pipeline import artifacts, config, paths, tracking
from pipeline.benchmark import launcher, results, workload
from pipeline.progress import console
from stages._main import run

# What MLflow keeps of each backend x load point (metrics/serving.json has every metric).
SERVING_METRICS = ("output_token_throughput", "request_throughput", "goodput", "ttft_ms_p99", "tpot_ms_p99")


def main() -> None:
    cfg = config.load(paths.PARAMS)
    with tracking.stage_run("serve", cfg) as stage:
        weights = artifacts.verify_manifest(paths.WEIGHTS_DIR)
        vocab_size = artifacts.manifest_field(paths.WEIGHTS_DIR, weights, "shape.vocab_size")
        requests, warmup = workload.build_requests(cfg.serving, vocab_size, paths.WEIGHTS_DIR)
        raw, plan = launcher.run_serving(cfg, vocab_size, requests, warmup)
        if not raw:
            console.print(f"[yellow]serve: none of serving.backends={list(cfg.serving.backends)} can run "
                          f"precision.name={cfg.precision.name} on hardware.device={cfg.hardware.device}; nothing "
                          f"served (recorded in {paths.SERVING_CONDITIONS})[/yellow]", highlight=False)
        summary = results.write_serving(raw, cfg.precision.name, cfg.to_dict()["serving"], paths.SERVING_METRICS,
                                        paths.SERVING_CONDITIONS, paths.SERVING_RECORDS, plan.skipped,
                                        plan.failed)
        for row in summary["points"]:
            console.print(f"serve {row['backend']:>15} {row['point']:>16}: {row['output_token_throughput']:>10.1f} "
                          f"output tok/s, TTFT p99 {row.get('ttft_ms_p99', float('nan')):.1f} ms, TPOT p99 "
                          f"{row.get('tpot_ms_p99', float('nan')):.2f} ms, goodput {row['goodput']:.2f} req/s",
                          highlight=False)
        stage.log_metrics({f"{row['backend']}.{row['point']}": row for row in summary["points"]}, prefix="serve.",
                          names=SERVING_METRICS)
        for path in (paths.SERVING_METRICS, paths.SERVING_CONDITIONS):
            stage.log_artifact(path, "serve")
        stage.set_tags({"serving_backends": ",".join(cfg.serving.backends), "model": cfg.model.name,
                        **({"failed_backends": ",".join(plan.failed)} if plan.failed else {})})


if __name__ == "__main__":
    run(main)
