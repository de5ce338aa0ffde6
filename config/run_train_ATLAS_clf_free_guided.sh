#!/usr/bin/env bash
# Classifier-free guided training, ATLAS, UNet v2; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_train.sh (NCCL options: config/_common.sh).
UNET_VER=v2 DATASET=atlas MASTER_PORT=${MASTER_PORT:-12366} SCRIPT=${SCRIPT:-scripts/train.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
