#!/usr/bin/env bash
# Nsight Compute on the kernels of one benchmark case, with the speed-of-light, memory
# workload and compute workload sections:
#
#   benchmarks/ncu.sh OP [fastattn profile options]
#   benchmarks/ncu.sh attention.additive.multi_query.forward --backend triton --batch 64
#
# OP is a case name of `fastattn bench` (`fastattn profile --help` lists the options).
# The case runs once on the GPU inside the NVTX range "fastattn.profile" (warm-up calls
# stay outside it) and only kernels launched in that range are profiled: at most
# LAUNCHES of them (default 10), restricted to names matching the regular expression
# KERNEL when it is set.  The report goes to "$OUT/ncu-OP.ncu-rep" (OUT defaults to
# benchmarks/results/latest) and is printed.  NCU and PYTHON pick the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: benchmarks/ncu.sh OP [fastattn profile options]" >&2
    exit 2
fi
op=$1
shift
OUT="${OUT:-benchmarks/results/latest}"
PYTHON="${PYTHON:-python}"
NCU="${NCU:-ncu}"
LAUNCHES="${LAUNCHES:-10}"
report="$OUT/ncu-$op"
mkdir -p "$OUT"

kernel_filter=()
if [ -n "${KERNEL:-}" ]; then
    kernel_filter=(--kernel-name "regex:$KERNEL")
fi

"$NCU" --nvtx --nvtx-include "fastattn.profile/" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --launch-count "$LAUNCHES" "${kernel_filter[@]}" --force-overwrite --export "$report" \
    "$PYTHON" -m fastattn profile "$op" --device cuda --iterations 1 "$@"
"$NCU" --import "$report.ncu-rep" --page details
