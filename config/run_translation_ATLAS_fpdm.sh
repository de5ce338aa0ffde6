#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, ATLAS, UNet v2: validation (thresholds), test, metrics.json, panels.png.
# Settings: `anofpdm presets atlas-anofpdm-v2`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=atlas-anofpdm-v2 MASTER_PORT=${MASTER_PORT:-12458}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
