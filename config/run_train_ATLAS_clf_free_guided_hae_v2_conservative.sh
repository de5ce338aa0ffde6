#!/usr/bin/env bash
# Classifier-free guided training, ATLAS, UNet hae_v2_conservative; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_train.sh (NCCL options: config/_common.sh).
UNET_VER=hae_v2_conservative DATASET=atlas MASTER_PORT=${MASTER_PORT:-12368} SCRIPT=${SCRIPT:-scripts/train_hae_v2_conservative.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
