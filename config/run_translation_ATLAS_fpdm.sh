#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, ATLAS, UNet v2: thresholds, test, metrics.json, panels.png.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_translation.sh (NCCL options: config/_common.sh).
UNET_VER=v2 DATASET=atlas MASTER_PORT=${MASTER_PORT:-12458} SCRIPT=${SCRIPT:-scripts/translation_FPDM.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
