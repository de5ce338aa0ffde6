#!/usr/bin/env bash
# AnoDDPM (DDPM, S=200) anomaly segmentation, BraTS (NOISE_TYPE=gaussian: AnoDDPM (G)); threshold tuned on pixel-labelled validation slices.
# Settings: `anofpdm presets brats-anoddpm-${NOISE_TYPE:-simplex}`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-anoddpm-${NOISE_TYPE:-simplex} MASTER_PORT=${MASTER_PORT:-12380}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
