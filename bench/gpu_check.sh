#!/usr/bin/env bash
# One-command GPU check: the CUDA tests, the memory / speed benchmark and the AnoFPDM loop, into one results file.
#   bash bench/gpu_check.sh OUT            # on a machine with a CUDA GPU (under 10 minutes: the limits sum to 570 s)
#   bash bench/gpu_check.sh OUT --smoke    # the same stages on the CPU at toy size (checks this script)
#   bash bench/gpu_check.sh OUT --dry-run  # print the stages and their time limits, run nothing
# OUT/gpu_check.md: card, driver, torch / CUDA / cuDNN versions, then per stage its status and time, the CUDA test
# summary, one table per variant set (activation memory, largest training batch under BUDGET_GIB and its step time,
# translation throughput of one cond+null forward in fp32 and bf16) and the AnoFPDM loop itself (ForwardProcess.run,
# bench/translation_loop.py: milliseconds per slice-step in fp32 and bf16 for Conservative and v2).
# Raw logs and JSON beside it (OUT/<stage>.log, OUT/memory_<variant>.json, OUT/anofpdm_loop.json). Each stage has its
# own time limit (`timeout`), so one that hangs or runs long is reported and the others still run. The upstream-style
# HAE variants (hae_v2, hae_lite, hae) materialise 8 x 4416^2 attention matrices: they run one repeat, translation
# at REFERENCE_TRANSLATION_BATCH slices, and only hae_v2 searches its largest batch (Conservative's yardstick).
# Variables: BUDGET_GIB (70), TRANSLATION_BATCH (64 slices: 128 rows per forward), REFERENCE_TRANSLATION_BATCH (16),
# LOOP_STEPS (3), VARIANTS, PYTHON, and the per-stage limits below. The CUDA settings are runtime.configure_cuda's
# (TF32 off, cuDNN autotuning on), the ones training and translation use.
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
REFERENCE_TRANSLATION_BATCH=${REFERENCE_TRANSLATION_BATCH:-16}
LOOP_STEPS=${LOOP_STEPS:-3}
VARIANTS=${VARIANTS:-hae_v2_conservative hae_v2 v2 hae_lite hae}   # most important first
# seconds per stage; the defaults sum to 20 + 120 + 75 + 90 + 60 + 60 + 60 + 75 + 10 = 570 s
LIMIT_INFO=${LIMIT_INFO:-20}
LIMIT_TESTS=${LIMIT_TESTS:-120}
LIMIT_FUSED=${LIMIT_FUSED:-75}              # hae_v2_conservative
LIMIT_V2=${LIMIT_V2:-60}
LIMIT_HAE_V2=${LIMIT_HAE_V2:-90}            # reference attention plus its largest-batch search
LIMIT_REFERENCE=${LIMIT_REFERENCE:-60}      # hae_lite, hae
LIMIT_LOOP=${LIMIT_LOOP:-75}
LIMIT_TABLE=${LIMIT_TABLE:-10}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = --smoke ]; then         # small sizes on the CPU: every stage runs, in about a minute
    # (fp32 only: bf16 convolutions on a CPU without bf16 units take minutes)
    COMMON=(--small --device cpu --threads 1 --repeats 1 --precisions fp32)
    FULL=("${COMMON[@]}" --translation-batch 2)
    LIGHT=("${COMMON[@]}" --translation-batch 2)
    SEARCH=()
    LOOP=(--small --device cpu --threads 1 --batch 2 --steps 1 --rounds 1 --precisions fp32)
    VARIANTS=${SMOKE_VARIANTS:-hae_v2_conservative v2}
    for name in LIMIT_FUSED LIMIT_V2 LIMIT_HAE_V2 LIMIT_REFERENCE LIMIT_LOOP; do
        printf -v "$name" '%s' "${SMOKE_LIMIT_VARIANT:-120}"
    done
else
    FULL=(--device cuda --repeats 3 --translation-batch "$TRANSLATION_BATCH" --precisions fp32,bf16)
    LIGHT=(--device cuda --repeats 1 --translation-batch "$REFERENCE_TRANSLATION_BATCH" --precisions fp32,bf16)
    SEARCH=(--budget-gib "$BUDGET_GIB")
    LOOP=(--device cuda --batch "$TRANSLATION_BATCH" --steps "$LOOP_STEPS" --rounds 2 --precisions fp32,bf16)
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
    case $v in
        hae_v2_conservative) limit=$LIMIT_FUSED; args=("${FULL[@]}" "${SEARCH[@]}") ;;
        v2) limit=$LIMIT_V2; args=("${FULL[@]}" "${SEARCH[@]}") ;;
        hae_v2) limit=$LIMIT_HAE_V2; args=("${LIGHT[@]}" "${SEARCH[@]}") ;;
        *) limit=$LIMIT_REFERENCE; args=("${LIGHT[@]}") ;;
    esac
    add_stage "memory_$v" "$limit" "$PYTHON" bench/memory_speed.py --variants "$v" "${args[@]}" \
        --json "$OUT/memory_$v.json"
done
LOOP_VARIANTS=$(for v in $VARIANTS; do case $v in hae_v2_conservative | v2) printf '%s,' "$v" ;; esac; done)
if [ -n "$LOOP_VARIANTS" ]; then
    add_stage anofpdm_loop "$LIMIT_LOOP" "$PYTHON" bench/translation_loop.py --variants "${LOOP_VARIANTS%,}" "${LOOP[@]}" \
        --json "$OUT/anofpdm_loop.json"
fi
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
    if [ -f "$OUT/anofpdm_loop.log" ]; then
        echo
        echo "## The AnoFPDM loop (bench/translation_loop.py: ForwardProcess.run, $LOOP_STEPS steps)"
        echo
        grep '^|' "$OUT/anofpdm_loop.log" || tail -n 5 "$OUT/anofpdm_loop.log" | sed 's/^/    /'
    fi
} >>"$RESULTS"
echo "results: $RESULTS" >&2
exit $FAILED
