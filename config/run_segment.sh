#!/usr/bin/env bash
# Whole-volume anomaly segmentation of NIfTI scans (scripts/segment.py): for every subject under INPUT, the anomaly
# map and mask as NIfTI on the scan's own grid, a JSON record, an overlay PNG; subjects.csv and summary.json.
# Every variable can be overridden from the environment and extra flags are passed last, e.g.
#   INPUT=data/BraTS21/BraTS2021_00000 HYPERPARAMS_FILE=logs/.../hyperparams.json bash config/run_segment.sh
#   CUDA_VISIBLE_DEVICES=0,1 INPUT="data/site_a data/site_b" bash config/run_segment.sh --batch_size 128
#   DATASET=atlas INPUT=data/ATLAS_2/Training bash config/run_segment.sh
# Hyper-parameters: HYPERPARAMS_FILE (a translation run's hyperparams.json), else a validation pass on DATA_DIR
# (a preprocessed folder with npy_val/). The model comes from MODEL_DIR/config.json (written by training); only a
# folder without one (upstream checkpoints) gets the model flags of config/_model_flags.sh. NNODES / NODE_RANK /
# MASTER_ADDR and DRY_RUN=1 work as for the other launchers (config/_common.sh). A killed run resumes where it
# stopped (finished subjects are kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATASET=${DATASET:-brats}              # brats | atlas (input layout, channels, defaults below)
UNET_VER=${UNET_VER:-hae_v2_conservative}
METHOD=${METHOD:-anofpdm}               # any method of guided_diffusion/methods (anofpdm, anoddpm, clf_guided, ddib)
MASTER_PORT=${MASTER_PORT:-12372}
BATCH_PER_GPU=${BATCH_PER_GPU:-128}    # slices per forward per process (a BraTS volume keeps ~130)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
NUM_GPUS=${NUM_GPUS:-}                 # empty: one process per visible GPU
CPU_PROCS=${CPU_PROCS:-1}
LOG_ROOT=${LOG_ROOT:-./logs}
if [ "$UNET_VER" = v2 ]; then SUFFIX=""; else SUFFIX="_$UNET_VER"; fi
if [ "$DATASET" = brats ]; then
    INPUT=${INPUT:-./data/BraTS21_training/BraTS21}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/clf_free_guided$SUFFIX}
    MOD=${MOD:-all}; MODALITY=${MODALITY:-0 3}; W=${W:-2}
elif [ "$DATASET" = atlas ]; then
    INPUT=${INPUT:-./data/ATLAS/ATLAS_2/Training}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/atlas_clf_free_guided$SUFFIX}
    MOD=${MOD:-t1}; IN_CHANNELS=${IN_CHANNELS:-1}; MODALITY=${MODALITY:-0}; W=${W:-30}
else
    echo "error: DATASET must be brats or atlas, got '$DATASET'" >&2
    exit 1
fi
OUTPUT=${OUTPUT:-$LOG_ROOT/segment_${DATASET}_${METHOD}$SUFFIX}
HYPERPARAMS_FILE=${HYPERPARAMS_FILE:-}
DATA_DIR=${DATA_DIR:-}                 # validation pass (when no HYPERPARAMS_FILE)
VAL_BATCHES=${VAL_BATCHES:-10}
MODEL_NUM=${MODEL_NUM:-}
EMA=${EMA:-True}
FORWARD_STEPS=${FORWARD_STEPS:-600}
PRECISION=${PRECISION:-fp32}

source config/_common.sh
source config/_model_flags.sh
if [ ! -d "$MODEL_DIR" ] && [ "$DRY_RUN" != 1 ]; then
    echo "error: MODEL_DIR=$MODEL_DIR is not a folder (train first, or set MODEL_DIR=...)" >&2
    exit 1
fi
if [ -f "$MODEL_DIR/config.json" ]; then
    MODEL_FLAGS=()                     # the model is built from config.json
else
    model_flags                        # upstream checkpoints: the model flags of _model_flags.sh
fi
count_processes

HYPER_FLAGS=(--num_batches_val "$VAL_BATCHES" --batch_size_val "$((BATCH_PER_GPU * NPROC * NNODES))")
if [ -n "$HYPERPARAMS_FILE" ]; then HYPER_FLAGS=(--hyperparams_file "$HYPERPARAMS_FILE"); fi
if [ -n "$DATA_DIR" ]; then HYPER_FLAGS+=(--data_dir "$DATA_DIR"); fi
# shellcheck disable=SC2206,SC2086  # INPUT and MODALITY are space-separated lists on purpose
FLAGS=(
    --input $INPUT --output "$OUTPUT" --method "$METHOD" --name "$DATASET" --mod "$MOD"
    --model_dir "$MODEL_DIR" --ema "$EMA" --w "$W" --forward_steps "$FORWARD_STEPS" --d_reverse True --null True
    --modality $MODALITY --batch_size "$BATCH_PER_GPU" --precision "$PRECISION" "${HYPER_FLAGS[@]}"
    "${MODEL_FLAGS[@]}"
)
if [ -n "$MODEL_NUM" ]; then FLAGS+=(--model_num "$MODEL_NUM"); fi
if [ "$DRY_RUN" != 1 ]; then mkdir -p "$OUTPUT"; fi
echo "$METHOD ($UNET_VER) on $INPUT: $NNODES node(s) x $NPROC process(es), $BATCH_PER_GPU slices per forward -> $OUTPUT" >&2
launch scripts/segment.py "${FLAGS[@]}" "$@"
