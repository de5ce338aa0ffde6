#!/usr/bin/env bash
# Classifier-free guided training, BraTS, UNet hae_v2; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_train.sh (NCCL options: config/_common.sh).
UNET_VER=hae_v2 DATASET=brats MASTER_PORT=${MASTER_PORT:-12361} SCRIPT=${SCRIPT:-scripts/train.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
