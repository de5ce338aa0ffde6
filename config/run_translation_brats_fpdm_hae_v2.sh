#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, BraTS, UNet hae_v2: thresholds, test, metrics.json, panels.png.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_translation.sh (NCCL options: config/_common.sh).
UNET_VER=hae_v2 DATASET=brats MASTER_PORT=${MASTER_PORT:-12363} SCRIPT=${SCRIPT:-scripts/translation_FPDM.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
