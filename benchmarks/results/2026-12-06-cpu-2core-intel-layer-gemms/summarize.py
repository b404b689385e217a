"""Prints the table of this folder's README from its run-<i>-<setting>.json files: per case,
fastattn's median time under each FASTATTN_CPU_LAYER_GEMM setting (brgemm, blas, and the
default: unset) over the runs (range) and its speed against the torch.nn peer timed in the
same runs (range)."""

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("brgemm", "blas", "default")

times, ratios = defaultdict(list), defaultdict(list)
for path in sorted(HERE.glob("run-*-*.json")):
    engine = path.stem.split("-")[-1]
    for row in json.loads(path.read_text())["results"]:
        if row["implementation"] != "cpu":
            continue
        times[row["case"], engine].append(row["median_s"] * 1e3)
        peer = next(name for name in row["speedup"] if name.startswith("torch.nn"))
        ratios[row["case"], engine].append(row["speedup"][peer])

cases = sorted({case for case, _ in times}, key=lambda case: (case.count(".") > 1, case))
print("| case | " + " | ".join(f"{e} ms | {e} vs torch.nn" for e in ENGINES) + " |")
print("|---|" + "---|---|" * len(ENGINES))
for case in cases:
    cells = []
    for engine in ENGINES:
        t, r = times[case, engine], ratios[case, engine]
        cells += [f"{min(t):.3g}-{max(t):.3g}", f"{min(r):.2f}-{max(r):.2f}x"]
    print(f"| {case} | " + " | ".join(cells) + " |")
