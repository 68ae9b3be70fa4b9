"""`python -m pipeline <command>`: compose params.yaml, check it, publish deferred MLflow runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.progress import console


def _compose(args: argparse.Namespace) -> int:
    import yaml

    from pipeline import compose

    raw = compose.compose_params(Path(args.conf), args.overrides)
    target = Path(args.output)
    if args.check:
        current = yaml.safe_load(target.read_text()) if target.is_file() else None
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


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
