#!/usr/bin/env bash
# One-command AnoFPDM demo on a fresh machine (CPU, or a GPU when one is visible):
#   1. installs the project (pip install -e ".[demo]"; CPU torch first when torch is missing and no GPU is seen),
#   2. generates a small BraTS-like synthetic data set (scripts/make_synthetic_brats.py),
#   3. preprocesses it at a small image size (scripts/preprocess.py),
#   4. trains a small hae_v2_conservative model for TRAIN_STEPS steps (scripts/train.py),
#   5. runs AnoFPDM (validation + test) and prints the metrics; pictures: $WORK/results/panels.png.
# Every stage is skipped when its output exists, so a second call resumes. Override any variable, e.g.
#   WORK=/tmp/qs TRAIN_STEPS=4000 IMAGE_SIZE=64 bash config/run_quickstart.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=${WORK:-./quickstart}
SUBJECTS=${SUBJECTS:-24}               # >= 20, so the 75/5/20 split has a validation subject
HEALTHY_FRACTION=${HEALTHY_FRACTION:-0.25}
IMAGE_SIZE=${IMAGE_SIZE:-32}
NUM_CHANNELS=${NUM_CHANNELS:-32}
NUM_RES_BLOCKS=${NUM_RES_BLOCKS:-1}
CHANNEL_MULT=${CHANNEL_MULT:-1,2,2,2}
ATTENTION=${ATTENTION:-16,8}
TRAIN_STEPS=${TRAIN_STEPS:-2000}
TRAIN_BATCH=${TRAIN_BATCH:-16}
LR=${LR:-2e-4}
EMA_RATE=${EMA_RATE:-0.999}            # short runs: 0.9999 would average mostly the initial weights
W=${W:-2}
RESPACING=${RESPACING:-ddim100}        # the forward process on a 100-step grid: 60 steps ~ t <= 600 of 1000
FORWARD_STEPS=${FORWARD_STEPS:-60}
EVAL_BATCH=${EVAL_BATCH:-32}
TEST_BATCHES=${TEST_BATCHES:-8}        # -1: the whole test split
VAL_BATCHES=${VAL_BATCHES:--1}         # -1: the whole validation split
WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 2)}
PYTHON=${PYTHON:-python3}

say() { printf '\n=== %s\n' "$*" >&2; }
START=$(date +%s)

# ---- 1. install ----
if ! (cd /tmp && "$PYTHON" -c "import guided_diffusion.translation, nilearn") >/dev/null 2>&1; then
    say "installing the project"
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
        # a bare "torch" requirement would download a multi-GB CUDA build
        "$PYTHON" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
    fi
    "$PYTHON" -m pip install -e ".[demo]"
fi

MODEL_FLAGS=(--unet_ver hae_v2_conservative --use_hae True --image_size "$IMAGE_SIZE" --in_channels 4 --num_classes 2
             --num_channels "$NUM_CHANNELS" --num_res_blocks "$NUM_RES_BLOCKS" --channel_mult "$CHANNEL_MULT"
             --attention_resolutions "$ATTENTION" --learn_sigma False
             --diffusion_steps 1000 --noise_schedule linear --rescale_timesteps False)

# ---- 2. synthetic data ----
if [ ! -f "$WORK/raw/.done" ]; then
    say "generating $SUBJECTS synthetic subjects"
    "$PYTHON" scripts/make_synthetic_brats.py --output "$WORK/raw" --num_subjects "$SUBJECTS" \
        --healthy_fraction "$HEALTHY_FRACTION" --seed 0 --workers "$WORKERS"
    touch "$WORK/raw/.done"
fi

# ---- 3. preprocessing ----
if [ ! -f "$WORK/data/.done" ]; then
    say "preprocessing at ${IMAGE_SIZE}x${IMAGE_SIZE}"
    "$PYTHON" scripts/preprocess.py --source "$WORK/raw" --name brats --mod all --image_size "$IMAGE_SIZE" \
        --output "$WORK/data" --workers "$WORKERS"
    touch "$WORK/data/.done"
fi

# ---- 4. training ----
LAST=$(printf '%s/model/ema_%s_%06d.pt' "$WORK" "$EMA_RATE" "$TRAIN_STEPS")
if [ ! -f "$LAST" ]; then
    say "training hae_v2_conservative for $TRAIN_STEPS steps (batch $TRAIN_BATCH)"
    OPENAI_LOGDIR="$WORK/model" "$PYTHON" scripts/train.py --data_dir "$WORK/data" --name brats "${MODEL_FLAGS[@]}" \
        --class_cond True --threshold 0.1 --dropout 0.0 --batch_size "$TRAIN_BATCH" --lr "$LR" \
        --ema_rate "$EMA_RATE" --max_steps "$TRAIN_STEPS" --total_epochs 100000 --save_interval "$TRAIN_STEPS" \
        --log_interval 100 --sample_shape 4 4 "$IMAGE_SIZE" "$IMAGE_SIZE" --w "$W" --preview_steps 25 \
        --num_workers 0 --resume_checkpoint auto
fi

# ---- 5. AnoFPDM ----
say "AnoFPDM: validation and test (w=$W, $FORWARD_STEPS forward steps on the $RESPACING grid)"
OPENAI_LOGDIR="$WORK/results" "$PYTHON" scripts/translation_FPDM_hae_v2_conservative.py --name brats \
    --data_dir "$WORK/data" --model_dir "$WORK/model" --model_num "$TRAIN_STEPS" --ema True --ema_rate "$EMA_RATE" \
    --w "$W" --forward_steps "$FORWARD_STEPS" --timestep_respacing "$RESPACING" --d_reverse True --null True \
    --modality 0 3 --batch_size "$EVAL_BATCH" --num_batches "$TEST_BATCHES" \
    --batch_size_val "$EVAL_BATCH" --num_batches_val "$VAL_BATCHES" --num_panels 8 "${MODEL_FLAGS[@]}"

"$PYTHON" - "$WORK/results/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
fmt = lambda v: "  n/a " if v is None else f"{100 * v:6.1f}"
print("\nAnoFPDM on the synthetic test slices (%):")
print(f"{'setup':<10} {'Dice':>6} {'IoU':>6} {'AUPRC':>6}  slices")
for setup in ("mixed", "unhealthy"):
    s = m[setup]
    print(f"{setup:<10} {fmt(s['dice'])} {fmt(s['iou'])} {fmt(s['auprc'])}  {s['n_slices']}")
print(f"classification accuracy {fmt(m['accuracy'])}")
PY
echo "metrics: $WORK/results/metrics.json   pictures: $WORK/results/panels.png   ($(( $(date +%s) - START )) s)"
