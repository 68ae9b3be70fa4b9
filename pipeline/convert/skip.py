"""A format left out by convert.formats still gets a (tiny) output, so the DVC graph stays static: a
manifest saying it was not requested. verify_parallel and the benchmark never load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import artifacts


def write_skipped(out_dir: Path, fmt: str, reason: str, kind: str | None = None) -> dict[str, Any]:
    """The manifest of an output that was not asked for (export_onnx_half and the engine stages use it too)."""
    with artifacts.atomic_dir(Path(out_dir)) as tmp:
        return artifacts.write_manifest(tmp, kind=kind or f"{fmt}-checkpoint", format=fmt, skipped=True, reason=reason)


def write_not_built(out_dir: Path, metrics_path: Path, log_path: Path, fmt: str, kind: str, reason: str) -> None:
    """An engine stage's outputs when it builds nothing: the manifest saying why, its metrics and its log."""
    write_skipped(out_dir, fmt, reason, kind)
    artifacts.atomic_write_json(Path(metrics_path), {"skipped": True})
    artifacts.atomic_write_text(Path(log_path), f"not built: {reason}\n")
