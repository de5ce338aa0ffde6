#!/usr/bin/env bash
# DDIB / classifier-free DDIM (S=450, w=1.1) anomaly segmentation, BraTS, the AnoFPDM v2 checkpoint: threshold tuned on pixel-labelled validation slices; metrics.json, panels.png.
# Variables (SWEEP, SAMPLE_STEPS, MODEL_DIR, ...): config/_baselines.sh and config/_launch_translation.sh.
UNET_VER=v2 DATASET=brats METHOD=ddib MASTER_PORT=${MASTER_PORT:-12382} SCRIPT=${SCRIPT:-scripts/translation_DDIB.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
