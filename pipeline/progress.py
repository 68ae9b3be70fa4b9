"""rich progress bars for long work (downloads, writes, benchmark runs), on stderr."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

from pipeline.errors import redact

# soft_wrap: a one-line error stays one line in CI logs and DVC output (rich would wrap at 80 columns
# when stderr is not a terminal).
console = Console(stderr=True, soft_wrap=True)


class _MaskedStream:
    """A text stream that writes through errors.redact to the stream it wraps (everything else is the wrapped
    stream's), so a credential never reaches the terminal, a CI log or DVC's output."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def mask_output() -> None:
    """Route this process's stdout and stderr through errors.redact: the console above (it writes to
    sys.stderr as it is at each print), print(), warnings, MLflow's log stream, the traceback of an
    unforeseen error. The entry points (stages/_main.py, pipeline/__main__.py) call it first."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _MaskedStream):
            setattr(sys, name, _MaskedStream(stream))


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
