"""Stage `report` library: reports/ (report.md + PNGs), metrics/headline.json and the `dvc plots` data.

    inputs.py    read and check the metrics files (ReportInputs -> ReportData)
    tables.py    compute tables and series from them (pure; no matplotlib)
    headline.py  the few numbers `dvc exp show` and MLflow show (no matplotlib)
    plots.py     draw one PNG per function (matplotlib, Agg)
    markdown.py  write report.md
    pareto.py    serving operating points: SLO checks, Pareto front, best per SLO (also used by `advise`)
    dvc_by_backend.json  Vega-Lite template for dvc.yaml's top-level plots: one line per backend

Usage: `report.build(report.ReportInputs(...), out_dir, headline_path=..., plot_data_path=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.report import headline as headline_mod
from pipeline.report import markdown, tables
from pipeline.report.inputs import ReportData, ReportInputs, load

__all__ = ["ReportData", "ReportInputs", "build"]

# One record per backend and scenario; dvc.yaml's top-level plots draw it one line per backend.


def build(inputs: ReportInputs, out_dir: Path, *, headline_path: Path | None = None,
          plot_data_path: Path | None = None) -> dict[str, Any]:
    """Write out_dir/ (report.md + PNGs) and, when given, headline_path and plot_data_path.

    Everything is read and computed before the first write; out_dir is built in `<out_dir>.partial/` and
    swapped in whole, and the two JSON files are written atomically after it, so a failure leaves the
    previous outputs as they were. Returns {"files": [names in out_dir], "headline": {...}}."""
    from pipeline.report import plots as draw  # matplotlib loads only here

    data = load(inputs)
    table = tables.scenario_table(data.benchmark, data.runs)
    head = headline_mod.headline(data.benchmark, data.conditions, data.evaluate)
    plots = ["latency.png", "throughput.png", "tpot_distribution.png", "roofline.png"]
    titles = {b: f"{b}: {tables.roofline_figures(data.conditions[b])}" for b in tables.backends(table)}
    if data.evaluate:
        plots.append("accuracy.png")
    if data.graph:
        plots.append("onnx_ops.png")
    if data.serving and data.serving["points"]:
        plots.append("serving.png")
    with artifacts.atomic_dir(out_dir) as tmp:
        draw.latency(table, tmp / "latency.png")
        draw.throughput(table, tmp / "throughput.png")
        draw.tpot_distribution(tables.tpot_groups(data.runs), tmp / "tpot_distribution.png")
        draw.roofline(table, titles, tmp / "roofline.png")
        if data.evaluate:
            draw.accuracy(tables.accuracy_rows(data.evaluate), tmp / "accuracy.png")
        if data.graph:
            draw.onnx_ops(tables.op_counts(data.graph), data.graph.get("ort_optimization"), tmp / "onnx_ops.png")
        if "serving.png" in plots:
            draw.serving(data.serving["points"], data.serving["settings"].get("slo", {}), tmp / "serving.png")
        (tmp / "report.md").write_text(markdown.render(data, table, plots))
    if plot_data_path is not None:
        artifacts.atomic_write_json(plot_data_path, tables.plot_records(table))
    # headline.json last: it is what tracking and `dvc exp show` read, so it changes only once the
    # report and plot data it summarizes are in place.
    if headline_path is not None:
        artifacts.atomic_write_json(headline_path, head)
    return {"files": ["report.md", *plots], "headline": head}
