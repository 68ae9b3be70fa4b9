"""rich progress bars for long work (downloads, writes, benchmark runs), on stderr."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

# soft_wrap: a one-line error stays one line in CI logs and DVC output (rich would wrap at 80 columns
# when stderr is not a terminal).
console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, total: float, unit: str = "items",
                 enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """Yield `advance(n)`. unit='bytes' shows sizes and speed; anything else shows n/total.
    enabled=False (non-zero ranks of a distributed run) shows nothing."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    # Not a terminal (DVC log, CI): rich prints the finished bar once instead of redrawing it.
    with Progress(*columns, console=console, transient=False, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
    if not sys.stderr.isatty():
        console.print(f"{description}: done ({total:,.0f} {unit})")
