#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, ATLAS, UNet hae_v2_conservative: validation (thresholds), test, metrics.json, panels.png.
# Runs on the CPU when no GPU is visible. Override any variable from the environment, and add or override flags
# as arguments, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 MODEL_NUM=210000 bash config/run_translation_ATLAS_fpdm_hae_v2_conservative.sh --num_batches 5
# (see config/_launch_translation.sh for every variable and the flags it passes).
UNET_VER=hae_v2_conservative
DATASET=atlas
SCRIPT=${SCRIPT:-scripts/translation_FPDM_hae_v2_conservative.py}
MASTER_PORT=${MASTER_PORT:-12464}      # distinct per config, so two runs can share a machine
BATCH_PER_GPU=${BATCH_PER_GPU:-224}      # per process; same inference budget as hae_v2's 14: 14 x 2784 / 160 MiB = 243 (bench/memory_speed.py)

# GPUs: which ones (a comma list; empty = none, run on the CPU) and how many processes to start.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
NUM_GPUS=${NUM_GPUS:-}                 # empty: one process per visible GPU

# NCCL options: see config/_common.sh (e.g. NCCL_P2P_DISABLE=1 when a multi-GPU run hangs at start-up).

source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
