#!/usr/bin/env bash
# AnoFPDM's classifier-free guided UNet (hae_v2), ATLAS: training (GPU if visible, else CPU).
# Settings: `anofpdm presets atlas-anofpdm-hae_v2`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=atlas-anofpdm-hae_v2 MASTER_PORT=${MASTER_PORT:-12367}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
