#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, ATLAS, UNet hae_v2_conservative: thresholds, test, metrics.json, panels.png.
# Variables, flags, several GPUs or nodes, DRY_RUN=1: config/_launch_translation.sh (NCCL options: config/_common.sh).
UNET_VER=hae_v2_conservative DATASET=atlas MASTER_PORT=${MASTER_PORT:-12464} SCRIPT=${SCRIPT:-scripts/translation_FPDM_hae_v2_conservative.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
