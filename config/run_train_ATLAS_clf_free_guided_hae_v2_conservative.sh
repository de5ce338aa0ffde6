#!/usr/bin/env bash
# Classifier-free guided training, ATLAS, UNet hae_v2_conservative. Runs on the CPU when no GPU is visible.
# Override any variable from the environment, and add or override flags as arguments, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 bash config/run_train_ATLAS_clf_free_guided_hae_v2_conservative.sh --max_steps 50000 --resume_checkpoint auto
# (see config/_launch_train.sh for every variable and the flags it passes).
UNET_VER=hae_v2_conservative
DATASET=atlas
SCRIPT=${SCRIPT:-scripts/train_hae_v2_conservative.py}
MASTER_PORT=${MASTER_PORT:-12368}      # distinct per config, so two trainings can share a machine
BATCH_PER_GPU=${BATCH_PER_GPU:-64}      # per process; same activation budget as hae_v2's 14 rows: 14 x 2798 / 561 MiB = 70 (bench/memory_speed.py)

# GPUs: which ones (a comma list; empty = none, train on the CPU) and how many processes to start.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
NUM_GPUS=${NUM_GPUS:-}                 # empty: one process per visible GPU

# NCCL options: see config/_common.sh (e.g. NCCL_P2P_DISABLE=1 when a multi-GPU run hangs at start-up).

source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
