#!/usr/bin/env bash
# Noisy-image classifier training (guides the clf_guided DM), BraTS: healthy/unhealthy slice labels -> logs/clf; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_train_baselines.sh and config/_launch_train.sh.
UNET_VER=v1 DATASET=brats KIND=classifier MASTER_PORT=${MASTER_PORT:-12375} SCRIPT=${SCRIPT:-scripts/train_classifier.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
