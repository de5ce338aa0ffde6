#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, ATLAS, UNet hae_v2_conservative: validation (thresholds), test, metrics.json, panels.png.
# Settings: `anofpdm presets atlas-anofpdm-hae_v2_conservative`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=atlas-anofpdm-hae_v2_conservative MASTER_PORT=${MASTER_PORT:-12464}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
