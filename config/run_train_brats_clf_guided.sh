#!/usr/bin/env bash
# Classifier-guided DM training, BraTS: class-conditional v1 UNet (label always seen, learned variance) -> logs/clf_guided; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_train_baselines.sh and config/_launch_train.sh.
UNET_VER=v1 DATASET=brats KIND=clf_guided MASTER_PORT=${MASTER_PORT:-12376} SCRIPT=${SCRIPT:-scripts/train.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
