#!/usr/bin/env bash
# DDIB / classifier-free DDIM anomaly segmentation, BraTS, on the AnoFPDM v2 checkpoint; threshold tuned on pixel-labelled validation slices.
# Settings: `anofpdm presets brats-ddib`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-ddib MASTER_PORT=${MASTER_PORT:-12382}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
