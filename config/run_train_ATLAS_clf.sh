#!/usr/bin/env bash
# Noisy-image classifier training (guides the clf_guided DM), ATLAS: healthy/unhealthy slice labels.
# Settings: `anofpdm presets atlas-clf_guided`; variables, several GPUs or nodes, DRY_RUN=1: config/_launch.sh.
COMMAND=train-classifier PRESET=atlas-clf_guided MASTER_PORT=${MASTER_PORT:-12475}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
