#!/usr/bin/env bash
# AnoFPDM anomaly segmentation, brats, UNet v2: validation (thresholds), test, metrics.json, panels.png.
# Runs on the CPU when no GPU is visible. Override any variable from the environment, and add or override flags
# as arguments, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 MODEL_NUM=210000 bash config/run_translation_brats_fpdm.sh --num_batches 5
# (see config/_launch_translation.sh for every variable and the flags it passes).
UNET_VER=v2
DATASET=brats
SCRIPT=${SCRIPT:-scripts/translation_FPDM.py}
MASTER_PORT=${MASTER_PORT:-12358}      # distinct per config, so two runs can share a machine
BATCH_PER_GPU=${BATCH_PER_GPU:-256}      # per process; same inference budget as hae_v2's 14: 14 x 2784 / 112 MiB = 348 (bench/memory_speed.py)

# GPUs: which ones (a comma list; empty = none, run on the CPU) and how many processes to start.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
NUM_GPUS=${NUM_GPUS:-}                 # empty: one process per visible GPU

# NCCL options: see config/_common.sh (e.g. NCCL_P2P_DISABLE=1 when a multi-GPU run hangs at start-up).

source "$(dirname "${BASH_SOURCE[0]}")/_launch_translation.sh"
