#!/usr/bin/env bash
# The first-contact GPU check (issue 25): every GPU path the platform ships, measured once, one process per part.
#
#   bash bench/gpu_check.sh | tee gpu_check.jsonl           # one CUDA GPU: under 8 minutes (a hard budget)
#   GPU_CHECK_CPU_SMOKE=1 bash bench/gpu_check.sh           # CPU, tiny model: proves every part runs (CI does this)
#
# Output: JSON lines on stdout, one per measurement (bench/gpu_check.py says what each field is), and one
# {"part": ..., "error": ...} line for a part that failed or did not fit the budget; a failed part's traceback is
# on stderr, not hidden. Each part runs in its own process (a freed model's memory would otherwise leak into the
# next variant's peak) under its own time limit, cut to what is left of the 8-minute budget. Exit status: 0 when
# every part succeeded, 1 when any failed (the others still ran). PYTHON selects the interpreter (default: python, else python3).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
BUDGET=470 # seconds: 8 minutes less the margin for the last part to be killed and reported
if [ "$SMOKE" = "1" ]; then
    BUDGET=900 # CI runners vary; on a quiet 2-core machine the smoke run takes about a minute
    TRAIN=240 COMPILED=240 DECODE=240 KERNELS=240
else
    TRAIN=60 COMPILED=120 DECODE=45 KERNELS=60
fi
failed=0

run() { # run <limit> <part> [args...]: one part in its own process; a failure is reported and the script goes on
    local limit=$1
    shift
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then
        failed=1
        printf '{"part": "%s", "args": "%s", "error": "not run: the %ds budget is spent"}\n' "$1" "$*" "$BUDGET"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    local started=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$PYTHON" bench/gpu_check.py "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        failed=1
        local why="exit $rc (traceback on stderr)"
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${limit}s"; fi
        printf '{"part": "%s", "args": "%s", "error": "%s", "seconds": %d}\n' "$1" "$*" "$why" $((SECONDS - started))
    fi
}

run 60 env
if [ "$SMOKE" = "1" ]; then
    # every code path once, at the smallest cost: both losses, AC on and off, eager and compiled, bf16 and int8
    run "$TRAIN" train --loss reference --ac on --compile off
    run "$COMPILED" train --loss chunked --ac off --compile on
    run "$DECODE" decode --rows 1 --quant none
    run "$DECODE" decode --rows 16 --quant int8
else
    run "$TRAIN" train --loss reference --ac on --compile off
    run "$TRAIN" train --loss chunked --ac on --compile off
    run "$COMPILED" train --loss chunked --ac on --compile on
    run "$TRAIN" train --loss chunked --ac off --compile off
    run "$COMPILED" train --loss chunked --ac off --compile on
    for rows in 1 16; do
        for quant in none int8; do
            run "$DECODE" decode --rows "$rows" --quant "$quant"
        done
    done
fi
run "$KERNELS" serve-kernels
exit "$failed"
