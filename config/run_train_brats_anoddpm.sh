#!/usr/bin/env bash
# AnoDDPM training, BraTS: unconditional v1 UNet on healthy slices, simplex noise (NOISE_TYPE=gaussian: AnoDDPM (G)) -> logs/anoddpm_<noise>; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_train_baselines.sh and config/_launch_train.sh.
UNET_VER=v1 DATASET=brats KIND=anoddpm MASTER_PORT=${MASTER_PORT:-12374} SCRIPT=${SCRIPT:-scripts/train.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
