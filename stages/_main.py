"""Shared entry-point wrapper: a PipelineError ends the stage with its one-line message, exit code 1."""

from __future__ import annotations

import sys
from typing import Callable

from rich.markup import escape

from pipeline.errors import PipelineError
from pipeline.progress import console


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # messages hold '.[extra]' hints
        sys.exit(1)
