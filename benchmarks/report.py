"""Ratios between the implementations of each group of a pytest-benchmark JSON file.

    python benchmarks/report.py RESULTS.json [--markdown]

For every group it prints each implementation's median time and how many times
faster fastattn's kernel ("cpu") is than it, and the peak-memory ratio where the
benchmark stored one.  All numbers come from the one run the file holds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def rows(results: dict) -> list[dict]:
    groups = defaultdict(dict)
    for bench in results["benchmarks"]:
        implementation = bench["params"]["implementation"]
        groups[bench["group"]][implementation] = bench
    table = []
    for group, members in sorted(groups.items()):
        ours = members.get("cpu")
        for implementation, bench in sorted(members.items()):
            row = {"group": group, "implementation": implementation, "median_ms": bench["stats"]["median"] * 1e3}
            if ours is not None:
                row["cpu_speedup"] = bench["stats"]["median"] / ours["stats"]["median"]
                if "peak_bytes" in bench["extra_info"] and "peak_bytes" in ours["extra_info"]:
                    row["peak_mib"] = bench["extra_info"]["peak_bytes"] / 2**20
                    row["cpu_memory_ratio"] = ours["extra_info"]["peak_bytes"] / max(bench["extra_info"]["peak_bytes"], 1)
            table.append(row)
    return table


def render(table: list[dict], markdown: bool) -> str:
    columns = ["group", "implementation", "median_ms", "cpu_speedup", "peak_mib", "cpu_memory_ratio"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{cell:<32}" if i < 2 else f"{cell:>12}" for i, cell in enumerate(cells)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--markdown", action="store_true")
    arguments = parser.parse_args()
    with open(arguments.results) as file:
        print(render(rows(json.load(file)), arguments.markdown))


if __name__ == "__main__":
    main()
