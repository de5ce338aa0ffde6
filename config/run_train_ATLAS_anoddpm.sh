#!/usr/bin/env bash
# AnoDDPM training, ATLAS: unconditional v1 UNet on healthy slices, simplex noise (NOISE_TYPE=gaussian: AnoDDPM (G)).
# Settings: `anofpdm presets atlas-anoddpm-${NOISE_TYPE:-simplex}`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=atlas-anoddpm-${NOISE_TYPE:-simplex} MASTER_PORT=${MASTER_PORT:-12474}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
