#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, BraTS, UNet v2: validation (thresholds), test, metrics.json, panels.png.
# Settings: `anofpdm presets brats-anofpdm-v2`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-anofpdm-v2 MASTER_PORT=${MASTER_PORT:-12358}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
