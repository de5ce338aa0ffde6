#!/usr/bin/env bash
# AnoFPDM's classifier-free guided UNet (v2), BraTS: training (GPU if visible, else CPU).
# Settings: `anofpdm presets brats-anofpdm-v2`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=brats-anofpdm-v2 MASTER_PORT=${MASTER_PORT:-12356}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
