#!/usr/bin/env bash
# AnoFPDM translation, ATLAS, UNet hae_v2_conservative. Override any variable from the environment
# (W, MODEL_NUM, NUM_GPUS, BATCH_PER_GPU, DATA_DIR, MODEL_DIR, FORWARD_STEPS, D_REVERSE, ...; see _launch_translation.sh).
# BATCH_PER_GPU is provisional until the memory benchmark (bench/) sets it.
VERSION=${VERSION:-hae_v2_conservative}
DATASET=atlas
PORT=${PORT:-12464}
BATCH_PER_GPU=${BATCH_PER_GPU:-28}
source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
