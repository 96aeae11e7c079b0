#!/usr/bin/env bash
# The prepared GPU verification run (issue 19); see benchmarks/gpu_check.py for the phases.
#   bash benchmarks/gpu_check.sh OUTDIR              # every phase, <= 8 min wall, JSON into OUTDIR
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR    # print the phases, run nothing
#   bash benchmarks/gpu_check.sh OUTDIR --only env,build,steps --budget 300
# Uses the machine's own python3 / torch / triton / nvcc; downloads nothing. PYTHON overrides
# the interpreter. The outer timeout is a backstop: the script keeps to its own budget
# (default 470 s) and rewrites OUTDIR/summary.json after every phase.
set -uo pipefail
cd "$(dirname "$0")/.."
exec timeout --kill-after=10 "${GPU_CHECK_WALL_S:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py run "$@"
