#!/usr/bin/env bash
# AnoFPDM's classifier-free guided UNet (hae_v2_conservative), ATLAS: training (GPU if visible, else CPU).
# Settings: `anofpdm presets atlas-anofpdm-hae_v2_conservative`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=atlas-anofpdm-hae_v2_conservative MASTER_PORT=${MASTER_PORT:-12368}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
