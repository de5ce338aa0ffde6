#!/usr/bin/env bash
# Classifier-guided DDIM (S=200, s=1000) anomaly segmentation, BraTS, v1 DM + noisy-image classifier: threshold tuned on pixel-labelled validation slices; metrics.json, panels.png.
# Variables (SWEEP, SAMPLE_STEPS, MODEL_DIR, ...): config/_baselines.sh and config/_launch_translation.sh.
UNET_VER=v1 DATASET=brats METHOD=clf_guided MASTER_PORT=${MASTER_PORT:-12381} SCRIPT=${SCRIPT:-scripts/translation_CLF.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
