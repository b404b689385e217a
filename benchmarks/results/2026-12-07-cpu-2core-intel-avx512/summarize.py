"""Prints, per case, the cpu backend's median time in each run-<i>-<before>.json and
run-<i>-<after>.json of this folder (ranges over the runs), the speed-up after / before
run by run, and fastattn's speed against the torch peer where the case has one.

    python summarize.py                        # avx2 (the commit before) -> avx512 (what landed)
    python summarize.py all512-avx2 all512     # the first form: AVX-512 for every kernel
    python summarize.py base main FOLDER       # the runs of another folder
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def medians(build, folder=HERE):
    runs = []
    for path in sorted(folder.glob(f"run-[0-9]-{build}.json")):
        results = json.loads(path.read_text())["results"]
        runs.append({r["case"]: r for r in results if r["implementation"] == "cpu" and r["median_s"]})
    return runs


def main():
    names = sys.argv[1:3] if len(sys.argv) > 2 else ["avx2", "avx512"]
    folder = Path(sys.argv[3]) if len(sys.argv) > 3 else HERE
    before, after = medians(names[0], folder), medians(names[1], folder)
    print(f"{'case':52s} {names[0] + ' ms':>17s} {names[1] + ' ms':>17s} {'speed-up':>11s}  vs torch (before -> after)")
    for case in before[0]:
        old = [run[case]["median_s"] * 1e3 for run in before]
        new = [run[case]["median_s"] * 1e3 for run in after]
        ratios = [o / n for o, n in zip(old, new)]
        peers = [name for name in before[0][case]["speedup"] if "reference" not in name]
        versus = ""
        if peers:
            peer = peers[0]
            versus = (f"{min(r[case]['speedup'][peer] for r in before):.2f}-{max(r[case]['speedup'][peer] for r in before):.2f}x -> "
                      f"{min(r[case]['speedup'][peer] for r in after):.2f}-{max(r[case]['speedup'][peer] for r in after):.2f}x ({peer})")
        print(f"{case:52s} {min(old):7.3g}-{max(old):<9.3g} {min(new):7.3g}-{max(new):<9.3g} {min(ratios):4.2f}-{max(ratios):<5.2f}  {versus}")


if __name__ == "__main__":
    main()
