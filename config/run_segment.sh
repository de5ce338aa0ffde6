#!/usr/bin/env bash
# Whole-volume anomaly segmentation of NIfTI scans (`anofpdm segment`): for every subject under INPUT, the anomaly
# map and mask as NIfTI on the scan's own grid, a JSON record and an overlay PNG; subjects.csv and summary.json.
#   INPUT=data/BraTS21/BraTS2021_00000 HYPERPARAMS_FILE=logs/brats-anofpdm-v2/hyperparams.json OUT_DIR=seg \
#       bash config/run_segment.sh
#   PRESET=atlas-anofpdm-v2 INPUT=data/ATLAS_2/Training DATA_DIR=data/atlas128 bash config/run_segment.sh
# The hyper-parameters come from HYPERPARAMS_FILE (an evaluation run's hyperparams.json), else a validation pass on
# DATA_DIR (a preprocessed folder). Settings: the preset (default brats-anofpdm-hae_v2_conservative); variables,
# several GPUs or nodes, DRY_RUN=1: config/_launch.sh. A killed run resumes where it stopped.
COMMAND=segment PRESET=${PRESET:-brats-anofpdm-hae_v2_conservative} MASTER_PORT=${MASTER_PORT:-12372}
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
