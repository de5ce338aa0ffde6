#!/usr/bin/env bash
# AnoDDPM (simplex, DDPM, S=200) anomaly segmentation, ATLAS, unconditional v1 UNet: threshold tuned on pixel-labelled validation slices; metrics.json, panels.png.
# Variables (SWEEP, SAMPLE_STEPS, MODEL_DIR, ...): config/_baselines.sh and config/_launch_translation.sh.
UNET_VER=v1 DATASET=atlas METHOD=anoddpm MASTER_PORT=${MASTER_PORT:-12480} SCRIPT=${SCRIPT:-scripts/translation_HEALTHY.py}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
