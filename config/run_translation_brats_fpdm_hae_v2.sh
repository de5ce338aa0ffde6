#!/usr/bin/env bash
# AnoFPDM translation, brats, UNet hae_v2. Override any variable from the environment
# (W, MODEL_NUM, NUM_GPUS, BATCH_PER_GPU, DATA_DIR, MODEL_DIR, FORWARD_STEPS, D_REVERSE, ...; see _launch_translation.sh).
# BATCH_PER_GPU is provisional until the memory benchmark (bench/) sets it.
VERSION=${VERSION:-hae_v2}
DATASET=brats
PORT=${PORT:-12363}
BATCH_PER_GPU=${BATCH_PER_GPU:-14}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
