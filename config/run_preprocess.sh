#!/usr/bin/env bash
# Preprocess raw volumes into the AnoFPDM slice format (npy_{train,val,test}/patient_<P>/slice_<z>.npz).
# Resumable: rerun after an interruption and finished subjects are skipped.
# Override any variable from the environment, e.g.  SOURCE=./data/ATLAS NAME=atlas MOD=t1 bash config/run_preprocess.sh
set -euo pipefail

SOURCE=${SOURCE:-./data/BraTS21_training/BraTS21}  # one folder per subject (BraTS2021_XXXXX/...)
NAME=${NAME:-brats}                               # brats | atlas (flattened <P>_T1w/<P>_mask or official BIDS)
MOD=${MOD:-all}                                   # all = [flair, t1, t1ce, t2]; atlas: t1
FIRST=${FIRST:-0}                                 # drop first N slices (0: none)
LAST=${LAST:-0}                                   # drop last M slices (0: none)
IMAGE_SIZE=${IMAGE_SIZE:-128}                     # paper: 128
WORKERS=${WORKERS:-4}                             # parallel processes (about one per core)
OUTPUT=${OUTPUT:-}                                # empty: $SOURCE/../preprocessed_data_${MOD}_${FIRST}${LAST}_${IMAGE_SIZE}

python ./scripts/preprocess.py --source "$SOURCE" --name "$NAME" --mod "$MOD" --first "$FIRST" --last "$LAST" \
    --image_size "$IMAGE_SIZE" --workers "$WORKERS" ${OUTPUT:+--output "$OUTPUT"}
