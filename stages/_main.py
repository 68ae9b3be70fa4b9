"""Shared entry-point wrapper: a PipelineError ends the stage with its one-line message, exit code 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from rich.markup import escape

from pipeline import artifacts, paths, tracking
from pipeline.errors import PipelineError, one_line
from pipeline.progress import console, mask_output

# Temporary directories of a stage and of the processes it starts (ONNX scratch, benchmark jobs): in the project,
# so what a killed stage left there is found and removed by the next one (sweep below).
SCRATCH = Path(".cache/tmp")


def sweep() -> None:
    """Remove what killed runs left: `.partial`/`.old`/`.tmp` of every output (a killed 8B weights stage leaves
    16 GB), half-saved tracking records, stages' scratch directories. What a live run holds locked stays."""
    outputs = [p for p in vars(paths).values() if isinstance(p, Path)]
    removed = []
    for top in sorted({p.parts[0] for p in outputs if len(p.parts) > 1}):  # artifacts/, metrics/, plots/
        removed += artifacts.sweep_stale(Path(top)) if Path(top).is_dir() else []
    removed += artifacts.sweep_stale(Path("."), recursive=False, outputs=tuple(p.name for p in outputs
                                                                               if len(p.parts) == 1))
    for folder in (Path(tracking.PENDING_DIR), SCRATCH):
        removed += artifacts.sweep_stale(folder, recursive=False) if folder.is_dir() else []
    for path in removed:
        console.print(f"removed {path}, left by a killed run", highlight=False)


def run(main: Callable[[], None]) -> None:
    mask_output()  # no credential in anything the stage prints, its traceback included
    try:
        sweep()
        with artifacts.scratch_dir(SCRATCH):
            main()
    except PipelineError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # messages hold '.[extra]' hints
        sys.exit(1)
    except (OSError, UnicodeDecodeError) as e:  # foreseeable I/O faults no closer spot named: permissions, disk
        console.print(f"[red]error:[/red] {escape(one_line(e))}", highlight=False)
        sys.exit(1)
