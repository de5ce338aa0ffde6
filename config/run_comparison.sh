#!/usr/bin/env bash
# The paper's comparison table (Che et al., Table 1) in one command, at a small size (`anofpdm compare`): trains or
# reuses every method's model, evaluates every method on the same test slices once per seed, and writes
# comparison.md, comparison.csv and comparison.png under OUT_DIR (default ./runs/comparison). Rerun to continue.
#   bash config/run_comparison.sh
#   DATA_DIR=data/brats64 SEEDS="0 1 2" bash config/run_comparison.sh
#   METHODS="anoddpm_simplex anofpdm" TRAIN_STEPS=2000 OUT_DIR=runs/cmp2 bash config/run_comparison.sh --lr 1e-4
# Each variable below, when set, becomes the flag of the same name in lower case (`anofpdm compare --help`).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
source "$REPO/config/_common.sh"       # CPU thread policy
ARGS=()
if [ -n "${OUT_DIR:-}" ]; then ARGS+=(--output "$OUT_DIR"); fi
for var in DATA_DIR NAME SEEDS METHODS TRAIN_STEPS TRAIN_BATCH LR EMA_RATE NUM_CHANNELS NUM_RES_BLOCKS CHANNEL_MULT \
    ATTENTION_RESOLUTIONS CLASSIFIER_WIDTH CLASSIFIER_DEPTH PREVIEW_STEPS FPDM_UNET_VER RESPACING W FORWARD_STEPS \
    ANODDPM_GAUSSIAN_STEPS ANODDPM_SIMPLEX_STEPS CLF_STEPS CLASSIFIER_SCALE DDIB_STEPS DDIB_W MODALITY EVAL_BATCH \
    TEST_BATCHES VAL_BATCHES NUM_SLICES SUBJECTS SYNTH_SHAPE IMAGE_SIZE WORKERS; do
    if [ -n "${!var:-}" ]; then
        case "$var" in  # lists are space-separated; any other value is kept whole (a path may hold spaces)
            SEEDS|METHODS|MODALITY|SYNTH_SHAPE) read -r -a words <<< "${!var}" ;;
            *) words=("${!var}") ;;
        esac
        ARGS+=("--$(echo "$var" | tr '[:upper:]' '[:lower:]')" "${words[@]}")
    fi
done
exec "$PYTHON" -m guided_diffusion compare "${ARGS[@]}" "$@"
