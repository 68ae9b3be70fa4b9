"""`python -m pipeline.sweep -m <overrides>`: a Hydra multirun in which every job is one DVC experiment.

Hydra expands the sweep and hands each combination to its launcher plugin: the basic launcher runs them one after
another here, `hydra/launcher=submitit_local` as parallel processes on this machine, `hydra/launcher=submitit_slurm`
as Slurm jobs (hydra-submitit-launcher). Each job runs `dvc exp run --temp` with its overrides: DVC composes
params.yaml from conf/, reproduces in a temporary copy of the workspace, restores unchanged stages from its
run-cache and keeps the result as a named experiment, so `dvc exp show` compares the sweep and every stage run
lands in MLflow as usual. Jobs on other hosts need this repository and its DVC cache on a shared filesystem.

Every combination is composed and validated here before any job is handed to the launcher: an impossible one
(parallel.tp=3, an unknown key) is one line naming the override, and nothing is submitted."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra.experimental.callback import Callback

from pipeline.artifacts import atomic_write_json
from pipeline.errors import PipelineError

CONF = Path("conf")  # the repository's, as `dvc exp run -S` composes it: run from the repository root
OWN_KEYS = ("sweep.", "hydra.", "hydra/")  # the sweep's and Hydra's own settings: not pipeline params


def pipeline_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that reach params.yaml (`dvc exp run -S`), without the sweep's and Hydra's own."""
    return [o for o in overrides if not o.lstrip("+~").startswith(OWN_KEYS)]


def expand(argv: Sequence[str]) -> list[list[str]]:
    """The pipeline overrides of each job Hydra's basic sweeper makes of this command line, in job order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    args = get_args_parser().parse_known_args(list(argv))[0]
    wanted = pipeline_overrides(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(wanted)
        (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except OverrideParseException as e:
        raise PipelineError(f"override {e.override}: {e.message.splitlines()[0]}") from None
    except HydraException as e:
        raise PipelineError(f"sweep: {str(e).splitlines()[0]}") from None
    if len(jobs) > 1 and not args.multirun:
        raise PipelineError(f"{len(jobs)} combinations without -m: add -m (--multirun) to run each as an experiment")
    names = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0] == "sweep.name"]
    if names and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", names[-1]):
        raise PipelineError(f"override sweep.name={names[-1]}: experiment names take letters, digits, '-' and '_'")
    return jobs


def check_all(jobs: Sequence[Sequence[str]]) -> None:
    """Compose and validate every job's params.yaml, as `python -m pipeline compose` would."""
    from pipeline import compose

    for number, overrides in enumerate(jobs):
        try:
            compose.compose_params(CONF, overrides)
        except PipelineError as e:
            raise PipelineError(f"sweep job {number} ({' '.join(overrides) or 'no overrides'}): {e}; nothing was "
                                f"launched") from None


def dvc_command(name: str, overrides: Sequence[str], targets: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name,
            *[arg for o in overrides for arg in ("-S", o)], *targets]


def stage_error(log: Path) -> str:
    """The failing stage's own one-line error from a dvc log, else DVC's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error: ")]
    return (ours or lines or ["no output"])[-1][:500]


def run_job(cfg) -> dict:
    """One Hydra job: `dvc exp run --temp` with its overrides, its output in <sweep dir>/<job number>/dvc.log.
    A failed experiment is recorded in result.json (the other jobs go on); Summary reports it and sets the exit code."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pipeline.progress import console

    hydra = HydraConfig.get()
    overrides = pipeline_overrides(hydra.overrides.task)
    number = hydra.job.num if hydra.mode == RunMode.MULTIRUN else 0  # a single run (no -m) is job 0
    name = f"{cfg.sweep.name}-{number}"
    out = Path(hydra.runtime.output_dir)
    log = out / "dvc.log"
    label = f"sweep job {number} ({' '.join(overrides) or 'no overrides'})"
    console.print(f"{label}: dvc exp run -n {name}, log {log}", highlight=False)
    start, started = time.monotonic(), time.time()
    with open(log, "w") as sink:
        code = subprocess.run(dvc_command(name, overrides, list(cfg.sweep.targets)), cwd=hydra.runtime.cwd,
                              stdout=sink, stderr=subprocess.STDOUT).returncode
    result = {"job": number, "experiment": name, "overrides": overrides, "returncode": code,
              "error": stage_error(log) if code else None, "seconds": round(time.monotonic() - start, 1),
              "started": started, "finished": time.time(), "host": socket.gethostname(), "log": str(log)}
    atomic_write_json(out / "result.json", result)
    console.print(f"{label}: " + (f"experiment {name} done in {result['seconds']} s" if code == 0 else
                                  f"failed: {result['error']} (log {log})"), highlight=False)
    return result


class Summary(Callback):
    """After the last job (on the machine that launched the sweep): one table of every job's result.json, and
    the exit code (1 if any experiment failed or left no result)."""

    failed = 0

    def __init__(self) -> None:
        self.folder: Path | None = None

    def on_run_start(self, config, **kwargs) -> None:
        self.folder = Path(str(config.hydra.run.dir))

    def on_multirun_start(self, config, **kwargs) -> None:
        self.folder = Path(str(config.hydra.sweep.dir))

    def on_run_end(self, config, **kwargs) -> None:
        self._report(1)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._report(len(list(self.folder.glob("*/.hydra"))))

    def _report(self, launched: int) -> None:
        from rich.markup import escape
        from rich.table import Table

        from pipeline.progress import console

        results = [json.loads(p.read_text()) for p in sorted(self.folder.glob("**/result.json"))]
        table = Table(title=f"sweep {self.folder}")
        for column in ("job", "overrides", "experiment", "result", "s"):
            table.add_column(column)
        for r in sorted(results, key=lambda r: r["job"]):
            table.add_row(str(r["job"]), " ".join(r["overrides"]), r["experiment"],
                          "[green]done[/green]" if r["returncode"] == 0 else f"[red]{escape(r['error'])}[/red]",
                          str(r["seconds"]))
        console.print(table)
        done = sum(r["returncode"] == 0 for r in results)
        Summary.failed = launched - done
        console.print(f"sweep: {done} of {launched} experiment(s) done"
                      + (f", {launched - len(results)} left no result (see {self.folder})" if launched > len(results)
                         else "") + "; compare them with `dvc exp show --only-changed`", highlight=False)


def main() -> None:
    from rich.markup import escape

    from pipeline.progress import console, mask_output

    mask_output()
    try:
        jobs = expand(sys.argv[1:])
        check_all(jobs)
    except PipelineError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(1)
    console.print(f"sweep: {len(jobs)} configuration(s) composed and valid", highlight=False)
    if len(jobs) > 1 and "hydra/launcher=submitit_local" in sys.argv:
        console.print("[yellow]note:[/yellow] submitit_local runs every job at once on this machine: their benchmark "
                      "and serve timings measure each other; time one at a time (the basic launcher, or "
                      "`dvc queue start -j 1`) or one job per node (submitit_slurm)", highlight=False)

    import hydra

    hydra.main(config_path=str(CONF.resolve()), config_name="sweep", version_base="1.3")(run_job)()
    sys.exit(1 if Summary.failed else 0)


if __name__ == "__main__":
    from pipeline import sweep  # Hydra imports the callback as pipeline.sweep.Summary: run that module, not __main__

    sweep.main()
