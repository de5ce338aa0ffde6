#!/usr/bin/env bash
# Classifier-guided DDIM anomaly segmentation, BraTS: v1 DM + noisy-image classifier; threshold tuned on pixel-labelled validation slices.
# Settings: `anofpdm presets brats-clf_guided`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=evaluate PRESET=brats-clf_guided MASTER_PORT=${MASTER_PORT:-12381}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
