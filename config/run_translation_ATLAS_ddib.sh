#!/usr/bin/env bash
# DDIB / classifier-free DDIM (S=300, w=1.3) anomaly segmentation, ATLAS, the AnoFPDM v2 checkpoint: threshold tuned on pixel-labelled validation slices; metrics.json, panels.png.
# Variables (SWEEP, SAMPLE_STEPS, MODEL_DIR, ...): config/_baselines.sh and config/_launch_translation.sh.
UNET_VER=v2 DATASET=atlas METHOD=ddib MASTER_PORT=${MASTER_PORT:-12482} SCRIPT=${SCRIPT:-scripts/translation_DDIB.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
