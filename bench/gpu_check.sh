#!/usr/bin/env bash
# One-command GPU check: the CUDA tests and the memory / speed benchmark, into one results file.
#   bash bench/gpu_check.sh OUT            # on a machine with a CUDA GPU (about 8 minutes at most)
#   bash bench/gpu_check.sh OUT --smoke    # the same stages on the CPU at toy size (checks this script)
#   bash bench/gpu_check.sh OUT --dry-run  # print the stages and their time limits, run nothing
# OUT/gpu_check.md: card, driver, torch / CUDA / cuDNN versions, then per stage its status and time, the CUDA test
# summary and one table per variant set: activation memory, largest training batch under BUDGET_GIB and its step
# time, translation throughput (slices per second through one AnoFPDM forward step) in fp32 and bf16.
# Raw logs and JSON beside it (OUT/<stage>.log, OUT/memory_<variant>.json). Each stage has its own time limit
# (`timeout`), so one that hangs or runs long is reported and the others still run. Variables: BUDGET_GIB (70),
# TRANSLATION_BATCH (64 slices: 128 rows per forward), VARIANTS, PYTHON, and the per-stage limits below.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT [--smoke | --dry-run]}
MODE=${2:-gpu}
case "$MODE" in gpu | --smoke | --dry-run) ;; *) echo "unknown mode '$MODE' (use --smoke or --dry-run)" >&2; exit 2 ;; esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$REPO"
PYTHON=${PYTHON:-python}
BUDGET_GIB=${BUDGET_GIB:-70}
TRANSLATION_BATCH=${TRANSLATION_BATCH:-64}
VARIANTS=${VARIANTS:-hae_v2_conservative hae_v2 v2 hae_lite hae}   # most important first
LIMIT_INFO=${LIMIT_INFO:-30}           # seconds per stage; sum of the defaults: 30 + 100 + 5 x 65 + 15 = 470 s
LIMIT_TESTS=${LIMIT_TESTS:-100}
LIMIT_VARIANT=${LIMIT_VARIANT:-65}
LIMIT_TABLE=${LIMIT_TABLE:-15}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = --smoke ]; then         # small sizes on the CPU: every stage runs, in about a minute
    # (fp32 only: bf16 convolutions on a CPU without bf16 units take minutes)
    BENCH=(--small --device cpu --threads 1 --repeats 1 --translation-batch 2 --precisions fp32)
    VARIANTS=${SMOKE_VARIANTS:-hae_v2_conservative v2}
    LIMIT_VARIANT=${SMOKE_LIMIT_VARIANT:-120}
else
    BENCH=(--device cuda --repeats 3 --budget-gib "$BUDGET_GIB" --translation-batch "$TRANSLATION_BATCH"
           --precisions fp32,bf16)
fi

STAGES=()
declare -A LIMITS COMMANDS
add_stage() {  # add_stage NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    STAGES+=("$name")
    LIMITS[$name]=$limit
    COMMANDS[$name]=$(printf '%q ' "$@")
}
add_stage info "$LIMIT_INFO" "$PYTHON" -c 'import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")'
add_stage cuda_tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests
for v in $VARIANTS; do
    add_stage "memory_$v" "$LIMIT_VARIANT" "$PYTHON" bench/memory_speed.py --variants "$v" "${BENCH[@]}" \
        --json "$OUT/memory_$v.json"
done
add_stage table "$LIMIT_TABLE" bash -c "$(printf '%q' "$PYTHON") bench/memory_speed.py --render $(printf '%q' "$OUT")/memory_*.json"

if [ "$MODE" = --dry-run ]; then
    total=0
    for s in "${STAGES[@]}"; do
        echo "[$s] limit ${LIMITS[$s]} s: ${COMMANDS[$s]}"
        total=$((total + LIMITS[$s]))
    done
    echo "at most $total s in all"
    exit 0
fi
if [ "$MODE" = gpu ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "error: no CUDA device visible to $PYTHON (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); use --smoke for a CPU run" >&2
    exit 2
fi

mkdir -p "$OUT"
RESULTS=$OUT/gpu_check.md
START=$(date +%s)
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) ($([ "$MODE" = --smoke ] && echo 'CPU smoke run' || echo GPU))"
    echo
    echo "- host: $(hostname), $(nproc) CPU cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/- GPU /'
    else
        echo "- GPU: none (nvidia-smi not found)"
    fi
} >"$RESULTS"

FAILED=0
SUMMARY=()
for s in "${STAGES[@]}"; do
    t0=$(date +%s)
    timeout --kill-after=10 "${LIMITS[$s]}" bash -c "${COMMANDS[$s]}" >"$OUT/$s.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (limit ${LIMITS[$s]} s)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("| $s | $status | $dt |")
    echo "[$s] $status in $dt s" >&2
done

{
    echo "- total $(($(date +%s) - START)) s"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "## Versions"
    echo
    sed 's/^/    /' "$OUT/info.log"
    echo
    echo "## CUDA tests (pytest -m cuda)"
    echo
    tail -n 15 "$OUT/cuda_tests.log" | sed 's/^/    /'
    echo
    echo "## Memory and speed (bench/memory_speed.py $([ "$MODE" = --smoke ] && echo --small), per sample unless noted)"
    grep -v '^#' "$OUT/table.log"
    for v in $VARIANTS; do
        if ! grep -q "^| $v |" "$OUT/table.log" 2>/dev/null; then
            echo
            echo "$v: no result; last lines of $OUT/memory_$v.log:"
            tail -n 5 "$OUT/memory_$v.log" | sed 's/^/    /'
        fi
    done
} >>"$RESULTS"
echo "results: $RESULTS" >&2
exit $FAILED
