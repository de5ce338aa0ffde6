#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, BraTS, UNet hae_v2_conservative: validation (thresholds), test, metrics.json, panels.png.
# Settings: `anofpdm presets brats-anofpdm-hae_v2_conservative`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-anofpdm-hae_v2_conservative MASTER_PORT=${MASTER_PORT:-12364}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
