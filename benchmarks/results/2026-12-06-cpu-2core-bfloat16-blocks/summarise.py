"""Summarises runs.txt (lines "after|before JSON"): per case, the best and the median over
the runs of each build, and the median of the per-process ratio reference / cpu."""
import json
import statistics
import sys
from pathlib import Path

runs = {}
for line in Path(sys.argv[1] if len(sys.argv) > 1 else "runs.txt").read_text().splitlines():
    build, measured = line.split(" ", 1)
    runs.setdefault(build, []).append(json.loads(measured))
cases = list(dict.fromkeys(name.rsplit(" ", 1)[0] for name in runs["after"][0]))
print("| case | before: best / median ms | after: best / median ms | reference / cpu, before | reference / cpu, after |")
print("|---|---|---|---|---|")
for case in cases:
    cells = []
    for build in ("before", "after"):
        times = [run[f"{case} cpu"] for run in runs[build]]
        cells.append(f"{min(times):.1f} / {statistics.median(times):.1f}")
    for build in ("before", "after"):
        ratios = [run[f"{case} reference"] / run[f"{case} cpu"] for run in runs[build]]
        cells.append(f"{statistics.median(ratios):.2f}x")
    print(f"| {case} | " + " | ".join(cells) + " |")
