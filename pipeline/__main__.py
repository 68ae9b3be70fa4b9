"""`python -m pipeline <command>`: compose params.yaml, check it, publish deferred MLflow runs, pick a serving
configuration for an SLO."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from pipeline.errors import PipelineError, one_line
from pipeline.report import pareto
from pipeline.progress import console, mask_output


def _compose(args: argparse.Namespace) -> int:
    from pipeline import compose, config

    raw = compose.compose_params(Path(args.conf), args.overrides)
    target = Path(args.output)
    if args.check:
        current = config.read_yaml(target) if target.is_file() else None
        if current != raw:
            console.print(f"[red]{target} is stale:[/red] it differs from what conf/ composes to; "
                          f"run `python -m pipeline compose` and commit it")
            return 1
        console.print(f"{target} is up to date with {args.conf}/")
        return 0
    compose.write_params(raw, target)
    console.print(f"wrote {target}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipeline import config

    config.load(args.params)
    console.print(f"{args.params}: valid")
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from pipeline import config, tracking

    cfg = config.load(args.params)
    pending = tracking.pending_records()
    if not pending:
        console.print("nothing to backfill")
        return 0
    try:
        done, left = tracking.backfill(cfg.tracking)
    except ConnectionError as e:
        raise PipelineError(f"backfill: MLflow {e}; {len(pending)} run(s) stay in {tracking.PENDING_DIR}") from None
    console.print(f"backfilled {done} run(s); {left} left")
    return 0 if left == 0 else 1


def _advise(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pipeline import advise

    slo = {name: bound for name, bound in (("ttft_ms", args.ttft_p99_ms), ("tpot_ms", args.tpot_p99_ms),
                                           ("e2el_ms", args.e2el_p99_ms)) if bound is not None}
    for name, bound in slo.items():
        if not bound > 0:
            raise PipelineError(f"--{name.removesuffix('_ms')}-p99-ms must be > 0, got {bound}")
    if args.results:
        runs = [advise.file_run(Path(p)) for p in args.results]
    else:
        runs = [r for r in [advise.workspace_run()] if r is not None] + advise.experiment_runs()
    if not runs:
        raise PipelineError("no serving results: run the serve stage (dvc repro serve, or dvc exp run) or give "
                            "--results metrics/serving.json")
    rows = advise.candidates(runs, slo, args.price_per_hour)
    if not rows:
        raise PipelineError(f"no measured serving points in {', '.join(r.source for r in runs)} (no backend of "
                            f"serving.backends could run there; see metrics/serving_conditions.json)")
    best, ok = advise.advise(rows, slo)
    sources = ", ".join(f"{k} ({v})" for k, v in advise.by_source(rows).items())
    console.print(f"{len(rows)} measured points from {sources}; SLO: {pareto.slo_text(slo)}", highlight=False)
    if best is None:
        console.print(f"[red]No measured run meets {pareto.slo_text(slo)}.[/red] Lowest p99s measured: "
                      + ", ".join(f"{m} {min(r.get(f'{m}_p99', float('inf')) for r in rows):.1f} ms" for m in slo),
                      highlight=False)
        return 1
    table = Table(title=f"Points meeting {pareto.slo_text(slo)}, by goodput")
    for col in ("backend", "precision", "tp x pp", "load", "slots", "source", "goodput req/s", "output tok/s",
                "TTFT p99 ms", "TPOT p99 ms", "per 1M out tok"):
        table.add_column(col, overflow="fold")
    for r in ok:
        table.add_row(r["backend"], r["precision"], f"{r.get('tp', 1)} x {r.get('pp', 1)}", pareto.load_label(r),
                      str(r.get("max_num_seqs") or "-"), r["source"],
                      "-" if r["slo_goodput"] is None else f"{r['slo_goodput']:.2f}",
                      f"{r['output_token_throughput']:.1f}", f"{r['ttft_ms_p99']:.1f}", f"{r['tpot_ms_p99']:.2f}",
                      "-" if r["cost_per_million"] is None else f"{r['cost_per_million']:.4g}")
    console.print(table)
    cost = ("; set hardware.price_per_hour or --price-per-hour for its cost" if best["cost_per_million"] is None
            else f", {best['cost_per_million']:.4g} per million output tokens")
    goodput = "n/a" if best["slo_goodput"] is None else f"{best['slo_goodput']:.2f}"
    console.print(f"[green]Best:[/green] {advise.describe(best)}: goodput {goodput} req/s, "
                  f"{best['output_token_throughput']:.1f} output tok/s{cost}", highlight=False)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pipeline import config, doctor

    report = doctor.doctor(config.load(args.params), params=str(args.params))
    if args.json:
        print(report.to_json())
    else:
        console.print(doctor.render(report))
    return 0  # doctor reports what cannot run; it does not fail for it


def _trtllm_bench(args: argparse.Namespace) -> int:
    from pipeline import config, paths, requirements
    from pipeline import trtllm_bench

    cfg = config.load(args.params)
    # Before anything is read or written: here (no GPU, no tensorrt_llm) this is the one line the user sees.
    requirements.require("trtllm-bench", requirements.Needs(("tensorrt_llm",), gpu=True),
                         requirements.Target(device="cuda", precision=cfg.precision.name,
                                             gpus=cfg.parallel.world_size))
    if args.engine_dir:  # trtllm-bench --backend tensorrt went with the engine flow after 1.2
        requirements.require("trtllm-bench --engine-dir", requirements.Needs(("tensorrt_llm_engine",), gpu=True))
    summary = trtllm_bench.run_all(cfg, paths.WEIGHTS_DIR, Path(args.output),
                                   engine_dir=Path(args.engine_dir) if args.engine_dir else None)
    for row in summary["points"]:
        console.print(f"trtllm-bench {row['backend']:>19} {row['point']:>16}: {row['output_token_throughput']:>10.1f} "
                      f"output tok/s, TTFT p99 {row.get('ttft_ms_p99', float('nan')):.1f} ms, TPOT p99 "
                      f"{row.get('tpot_ms_p99', float('nan')):.2f} ms", highlight=False)
    for key, why in summary["settings"]["skipped"].items():
        console.print(f"[yellow]trtllm-bench: skipped {key}: {escape(why)}[/yellow]", highlight=False)
    console.print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    mask_output()  # no credential in anything the CLI prints
    # The usage line names how the user started it: the `llama3-pipeline` console script or `python -m pipeline`.
    script = Path(sys.argv[0]).name
    prog = "python -m pipeline" if script in ("__main__.py", "-c") else script
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="compose conf/ (+ Hydra overrides) into params.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. precision=bf16 parallel.tp=2")
    p.add_argument("--conf", default="conf")
    p.add_argument("--output", default="params.yaml")
    p.add_argument("--check", action="store_true", help="exit 1 if the output differs from what conf/ composes to")
    p.set_defaults(func=_compose)
    p = sub.add_parser("validate", help="validate params.yaml against the schema")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_validate)
    p = sub.add_parser("backfill", help="log runs saved while MLflow was unreachable")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_backfill)
    p = sub.add_parser("advise", help="the measured serving configuration with the highest goodput meeting an SLO")
    p.add_argument("--ttft-p99-ms", type=float, help="time to first token, p99 bound (ms)")
    p.add_argument("--tpot-p99-ms", type=float, help="time per output token, p99 bound (ms)")
    p.add_argument("--e2el-p99-ms", type=float, help="end-to-end latency, p99 bound (ms)")
    p.add_argument("--price-per-hour", type=float, help="machine price per hour (default: each run's "
                   "hardware.price_per_hour)")
    p.add_argument("--results", nargs="*", help="metrics/serving.json files to read instead of the workspace "
                   "and the DVC experiments")
    p.set_defaults(func=_advise)
    p = sub.add_parser("doctor", help="which stages and backends can run on this machine under params.yaml, and why not")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (on stdout) instead of tables")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("trtllm-bench", help="NVIDIA's trtllm-bench throughput on the serve stage's requests, "
                       "its report in the serving metric names")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--engine-dir", help="a trtllm-build engine directory: run trtllm-bench's tensorrt backend "
                   "(TensorRT-LLM <= 1.2) instead of the PyTorch flow on artifacts/weights")
    p.add_argument("--output", default="metrics/trtllm_bench.json")
    p.set_defaults(func=_trtllm_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # messages hold '.[extra]' hints
        return 1
    except (OSError, UnicodeDecodeError) as e:  # foreseeable I/O faults no closer spot named: permissions, disk
        console.print(f"[red]error:[/red] {escape(one_line(e))}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
