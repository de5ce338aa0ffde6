#!/usr/bin/env bash
# Shared launcher of the training configs (config/run_train_*.sh set a few variables, then source this file).
# Builds upstream's production flags, starts torchrun when GPUs are visible or several processes are asked
# for, plain python for one CPU process, and passes the config's own arguments last, so they override:
#   bash config/run_train_brats_clf_free_guided.sh --max_steps 1000 --resume_checkpoint auto
# Every variable can be overridden from the environment, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 BATCH_PER_GPU=16 bash config/run_train_brats_clf_free_guided_hae_v2.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- what the calling config sets (defaults = BraTS, v2) ----
UNET_VER=${UNET_VER:-v2}               # v2 | hae | hae_lite | hae_v2 | hae_v2_conservative (HAE: --use_hae True)
DATASET=${DATASET:-brats}              # brats | atlas
SCRIPT=${SCRIPT:-scripts/train.py}     # or an upstream-named alias such as scripts/train_hae_v2_conservative.py
MASTER_PORT=${MASTER_PORT:-29500}      # rendezvous port, really passed to torchrun (upstream's was ignored)
MASTER_ADDR=${MASTER_ADDR:-localhost}
BATCH_PER_GPU=${BATCH_PER_GPU:-14}     # rows per process (memory bound; see bench/)
NUM_GPUS=${NUM_GPUS:-}                 # processes on GPUs, one per GPU (empty: every visible GPU)
CPU_PROCS=${CPU_PROCS:-1}              # processes without GPU (1: plain python, no process group)

# ---- data, output, schedule ----
DATA_ROOT=${DATA_ROOT:-./data}
LOG_ROOT=${LOG_ROOT:-./logs}
if [ "$UNET_VER" = v2 ]; then SUFFIX=""; else SUFFIX="_$UNET_VER"; fi
if [ "$DATASET" = brats ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/BraTS21_training/preprocessed_data_all_00_128}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$LOG_ROOT/clf_free_guided$SUFFIX}   # what the translation configs read
    IN_CHANNELS=${IN_CHANNELS:-4}
    TOTAL_EPOCHS=${TOTAL_EPOCHS:-200}
elif [ "$DATASET" = atlas ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/ATLAS/preprocessed_data_t1_00_128}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$LOG_ROOT/atlas_clf_free_guided$SUFFIX}
    IN_CHANNELS=${IN_CHANNELS:-1}
    TOTAL_EPOCHS=${TOTAL_EPOCHS:-1000}
else
    echo "error: DATASET must be brats or atlas, got '$DATASET'" >&2
    exit 1
fi
SAVE_INTERVAL=${SAVE_INTERVAL:-5000}
THRESHOLD=${THRESHOLD:-0.1}            # classifier-free label-drop probability
W=${W:-1 1.8 2 3}                      # guidance weights of the preview grids
PYTHON=${PYTHON:-python}
export OPENAI_LOGDIR MASTER_ADDR MASTER_PORT

source config/_common.sh    # the working directory is the repository root (cd above)
count_processes
BATCH_SIZE=${BATCH_SIZE:-$((BATCH_PER_GPU * NPROC))}
mkdir -p "$OPENAI_LOGDIR"

HAE_FLAGS=()
if [ "$UNET_VER" != v2 ]; then HAE_FLAGS=(--use_hae True); fi
# shellcheck disable=SC2206  # W is a space-separated list on purpose
FLAGS=(
    --name "$DATASET"
    --w $W --threshold "$THRESHOLD"
    --image_size 128 --num_classes 2 --class_cond True --ret_lab True --mixed True
    --unet_ver "$UNET_VER" --clf_free True "${HAE_FLAGS[@]}" --in_channels "$IN_CHANNELS" --num_channels 128
    --attention_resolutions 32,16,8 --learn_sigma False --dropout 0.1 --weight_decay 0
    --diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False
    --noise_type gaussian
    --data_dir "$DATA_DIR" --image_dir "$OPENAI_LOGDIR/images" --batch_size "$BATCH_SIZE" --ddpm_sampling False
    --total_epochs "$TOTAL_EPOCHS"
    --save_interval "$SAVE_INTERVAL" --sample_shape 12 "$IN_CHANNELS" 128 128
)

launch "$SCRIPT" "${FLAGS[@]}" "$@"
