#!/usr/bin/env bash
# Classifier-guided DM training, BraTS: class-conditional v1 UNet (label always seen, learned variance).
# Settings: `anofpdm presets brats-clf_guided`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train PRESET=brats-clf_guided MASTER_PORT=${MASTER_PORT:-12376}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
