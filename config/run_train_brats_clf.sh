#!/usr/bin/env bash
# Noisy-image classifier training (guides the clf_guided DM), BraTS: healthy/unhealthy slice labels.
# Settings: `anofpdm presets brats-clf_guided`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train-classifier PRESET=brats-clf_guided MASTER_PORT=${MASTER_PORT:-12375}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
