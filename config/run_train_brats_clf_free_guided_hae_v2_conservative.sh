#!/usr/bin/env bash
# AnoFPDM's classifier-free guided UNet (hae_v2_conservative), BraTS: training (GPU if visible, else CPU).
# Settings: `anofpdm presets brats-anofpdm-hae_v2_conservative`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=brats-anofpdm-hae_v2_conservative MASTER_PORT=${MASTER_PORT:-12362}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
