"""Markdown rows for BENCHMARKS.md from serve-stage results: one row per backend x load point.

    python benchmarks/serving_table.py benchmarks/h200-llama3-8b-serving/run2/*/serving.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.report import pareto


def rows(path: Path) -> list[str]:
    summary = json.loads(path.read_text())
    s = summary["settings"]
    out = []
    for r in summary["points"]:
        out.append(f"| {path.parent.name} | {r['backend']} | {r['precision']} | {s['input_len']}/{s['output_len']} "
                   f"| {pareto.load_label(r)} | {s['max_num_seqs']} | {r['completed']} | **{r['output_token_throughput']:,.0f}** "
                   f"| {r.get('throughput_roofline_pct', float('nan')):.1f} % | {r['request_throughput']:.2f} "
                   f"| {r['goodput']:.2f} | {r['ttft_ms_median']:,.0f} / {r['ttft_ms_p99']:,.0f} "
                   f"| {r['tpot_ms_median']:.1f} / {r['tpot_ms_p99']:.1f} | {r['itl_ms_median']:.1f} / {r['itl_ms_p99']:.1f} "
                   f"| {r.get('kv_slot_utilization', 0) * 100:.0f} % | {r['peak_memory_mb'] / 1024:.1f} |")
    return out


if __name__ == "__main__":
    print("| run | backend | precision | in/out | load | slots | requests | output tok/s | % of bound | req/s "
          "| goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | KV-slot use | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print("\n".join(rows(Path(arg))))
