#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, BraTS, UNet hae_v2: validation (thresholds), test, metrics.json, panels.png.
# Settings: `anofpdm presets brats-anofpdm-hae_v2`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-anofpdm-hae_v2 MASTER_PORT=${MASTER_PORT:-12363}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
