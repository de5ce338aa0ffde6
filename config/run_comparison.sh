#!/usr/bin/env bash
# The paper's comparison table (Che et al., Table 1) in one command, at a small size (CPU; a visible GPU is used):
# on one data set it trains or reuses the models of AnoDDPM (G) and (S), DDIM + classifier, DDIM classifier-free
# (DDIB) and AnoFPDM through the training configs, runs every method through the evaluation driver with its
# translation config on the same test slices, once per seed, and writes comparison.md, comparison.csv and
# comparison.png under OUT_DIR (default ./runs/comparison). Rerun after an interruption: it continues.
#   bash config/run_comparison.sh                                # the quickstart's synthetic data (made if missing)
#   DATA_DIR=data/preprocessed_data_all_00_64 SEEDS="0 1 2" bash config/run_comparison.sh
#   METHODS="anoddpm_simplex anofpdm" TRAIN_STEPS=2000 OUT_DIR=runs/cmp2 bash config/run_comparison.sh --lr 1e-4
# Each variable below, when set, becomes the flag of the same name in lower case (defaults and meaning:
# python scripts/comparison.py --help; the README's "Comparison" section); extra arguments are passed last.
# The data stage is the quickstart's (config/run_quickstart.sh with STOP_AFTER=data), so its variables (SUBJECTS,
# SYNTH_SHAPE, IMAGE_SIZE, SEED, WORKERS, INSTALL, ...) apply to it. With the defaults, from an empty folder, on the
# 2-core reference machine: see the README (about an hour of CPU time).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/runs/comparison}
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac    # relative to where the command was started
case "${DATA_DIR:-}" in "" | /*) ;; *) DATA_DIR="$PWD/$DATA_DIR" ;; esac
PYTHON=${PYTHON:-python3}
cd "$REPO"
source config/_common.sh       # CPU thread policy (OMP_WAIT_POLICY=PASSIVE unless set)

ARGS=(--out "$OUT_DIR")
for var in DATA_DIR NAME SEEDS METHODS TRAIN_STEPS TRAIN_BATCH LR EMA_RATE NUM_CHANNELS NUM_RES_BLOCKS CHANNEL_MULT \
    ATTENTION_RESOLUTIONS CLASSIFIER_WIDTH CLASSIFIER_DEPTH PREVIEW_STEPS FPDM_UNET_VER RESPACING W FORWARD_STEPS \
    ANODDPM_GAUSSIAN_STEPS ANODDPM_SIMPLEX_STEPS CLF_STEPS CLASSIFIER_SCALE DDIB_STEPS DDIB_W MODALITY EVAL_BATCH \
    TEST_BATCHES VAL_BATCHES NUM_SLICES; do
    if [ -n "${!var:-}" ]; then
        flag="--$(echo "$var" | tr '[:upper:]' '[:lower:]')"
        case "$var" in
        SEEDS | METHODS) read -r -a words <<< "${!var}"; ARGS+=("$flag" "${words[@]}") ;;  # lists
        *) ARGS+=("$flag" "${!var}") ;;
        esac
    fi
done
exec "$PYTHON" scripts/comparison.py "${ARGS[@]}" "$@"
