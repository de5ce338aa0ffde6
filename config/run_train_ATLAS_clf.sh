#!/usr/bin/env bash
# Noisy-image classifier training (guides the clf_guided DM), ATLAS: healthy/unhealthy slice labels -> logs/atlas_clf; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_train_baselines.sh and config/_launch_train.sh.
UNET_VER=v1 DATASET=atlas KIND=classifier MASTER_PORT=${MASTER_PORT:-12475} SCRIPT=${SCRIPT:-scripts/train_classifier.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
