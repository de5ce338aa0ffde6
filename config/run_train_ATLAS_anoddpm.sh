#!/usr/bin/env bash
# AnoDDPM training, ATLAS: unconditional v1 UNet on healthy slices, simplex noise (NOISE_TYPE=gaussian: AnoDDPM (G)) -> logs/atlas_anoddpm_<noise>; GPU if visible, else CPU.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_train_baselines.sh and config/_launch_train.sh.
UNET_VER=v1 DATASET=atlas KIND=anoddpm MASTER_PORT=${MASTER_PORT:-12474} SCRIPT=${SCRIPT:-scripts/train.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_train.sh"
