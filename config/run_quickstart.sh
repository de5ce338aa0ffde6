#!/usr/bin/env bash
# One-command AnoFPDM demo on a fresh machine (CPU; a visible GPU is used automatically):
#   1. installs the project when guided_diffusion is not importable (pip install -e ".[demo]"; the pinned
#      torch==TORCH_VERSION first when torch is missing),
#   2. generates a small BraTS-like synthetic data set (guided_diffusion.data.synthetic, nilearn's MNI152 templates),
#   3. preprocesses it at a small image size (scripts/preprocess.py),
#   4. trains a small hae_v2_conservative model, classifier-free (label drop 0.1), for TRAIN_STEPS steps,
#   5. runs AnoFPDM (validation picks the thresholds, then the test slices), prints Dice / IoU / AUPRC for the
#      mixed and unhealthy setups and the classification accuracy, and writes PNG panels.
# Everything goes under OUT_DIR (default ./runs/quickstart). Every stage resumes: rerun the same command after an
# interruption and finished subjects, checkpoints and test batches are kept. Override any variable, e.g.
#   OUT_DIR=/tmp/qs TRAIN_STEPS=3000 IMAGE_SIZE=64 CHANNEL_MULT=1,2,2,2 bash config/run_quickstart.sh
# (changing the data or model settings needs a new OUT_DIR). What the defaults reach and how long they take: the
# README ("Two commands"; bench/quickstart_eval.py re-measures it).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/runs/quickstart}
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac   # relative to where the command was started
cd "$REPO"

# ---- data ----
RAW_DIR=${RAW_DIR:-}                   # your own raw data in the BraTS 2021 layout (<P>/<P>_{flair,t1,t1ce,t2,seg}.nii.gz);
                                       # empty: generate synthetic subjects into $OUT_DIR/raw
SUBJECTS=${SUBJECTS:-24}               # synthetic subjects
HEALTHY_FRACTION=${HEALTHY_FRACTION:-0.25}
PRESET=${PRESET:-default}              # synthetic lesions: default | small | faint | multi | small_faint
SEED=${SEED:-0}                        # data, training and evaluation seed
VAL_LESION_SUBJECTS=${VAL_LESION_SUBJECTS:-1}  # validation gets >= 1 subject with a lesion (AnoFPDM's M_max needs one)
SYNTH_SHAPE=${SYNTH_SHAPE:-240 240 155}  # synthetic volume size (BraTS); smaller only for tests
IMAGE_SIZE=${IMAGE_SIZE:-32}           # slices are resized to IMAGE_SIZE² (paper: 128)
# ---- model and training ----
NUM_CHANNELS=${NUM_CHANNELS:-32}
CHANNEL_MULT=${CHANNEL_MULT:-1,2,2}    # 32 -> 16 -> 8 px; HAE blocks before each decoder upsampling
ATTENTION=${ATTENTION:-8}              # self-attention at 8 px
TRAIN_STEPS=${TRAIN_STEPS:-1000}
TRAIN_BATCH=${TRAIN_BATCH:-16}
LR=${LR:-3e-4}
EMA_RATE=${EMA_RATE:-0.995}            # short runs: 0.9999 would average mostly the initial weights
# ---- AnoFPDM ----
W=${W:-2}                              # guidance weight (paper: 2 for BraTS)
RESPACING=${RESPACING:-ddim100}        # forward process on a 100-step grid (paper: 600 of the 1000 steps)
FORWARD_STEPS=${FORWARD_STEPS:-30}     # 30 steps reach t = 300: a briefly trained model is too blurry beyond
MODALITY=${MODALITY:-0 3}              # FLAIR and T2 (tumours are bright on both)
EVAL_BATCH=${EVAL_BATCH:-32}
MEDIAN_KERNEL=${MEDIAN_KERNEL:-3}      # anomaly-map median window: 3 px at 32 px (upstream's 5 at 128 px erases small lesions)
QUANTILE_A=${QUANTILE_A:-0.93}         # mask quantiles of Algorithm 1 (upstream 0.90 / 0.98): a for the strongest
QUANTILE_B=${QUANTILE_B:-0.99}         #   anomaly scores, b for the weakest (tuned on presets default, small at seed 0)
VAL_BATCHES=${VAL_BATCHES:--1}         # -1: the whole validation split (one subject, ~150 slices)
TEST_BATCHES=${TEST_BATCHES:--1}       # -1: the whole test split (5 subjects, ~750 slices); a number: that many batches
NUM_PANELS=${NUM_PANELS:-8}
EVAL_PROCS=${EVAL_PROCS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)}  # CPU: AnoFPDM's slices shared by this many one-thread
                                       #   processes (torchrun; the same results for any count); a GPU: one process
EVAL_PORT=${MASTER_PORT:-}             # their rendezvous port (local); empty: a free one, so two quickstarts can run
WORKERS=${WORKERS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)}  # (GNU nproc obeys OMP_NUM_THREADS)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # the pinned wheel installed when torch is missing
INSTALL=${INSTALL:-auto}               # auto: pip-install when guided_diffusion/nilearn do not import; never: skip
STOP_AFTER=${STOP_AFTER:-}             # data: stop once $OUT_DIR/data is ready (config/run_comparison.sh's data stage)

say() { printf '\n=== [quickstart %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
START=$(date +%s)
mkdir -p "$OUT_DIR"

# ---- 1. install ----
if [ "$INSTALL" != never ] && ! (cd / && "$PYTHON" -c "import guided_diffusion.evaluation.translation, nilearn") >/dev/null 2>&1; then
    say "installing the project (pip install -e .[demo])"
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        # the pinned version first (as .ci/run does): a bare "torch" requirement may pull a multi-GB build
        "$PYTHON" -m pip install "torch==$TORCH_VERSION"
    fi
    "$PYTHON" -m pip install -e ".[demo]"
fi
DEVICE=$("$PYTHON" -c 'import torch; print(f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU")')
say "output folder $OUT_DIR; running on the $DEVICE"

source config/_common.sh       # CPU thread policy (OMP_WAIT_POLICY=PASSIVE unless set)
# the model flags of the shared list (config/_model_flags.sh) at the quickstart's small size
UNET_VER=hae_v2_conservative IN_CHANNELS=4 NUM_RES_BLOCKS=1 ATTENTION_RESOLUTIONS=$ATTENTION
source config/_model_flags.sh
model_flags

# ---- 2. synthetic data (resumable: existing subjects are kept), unless RAW_DIR points at real data ----
if [ -n "$RAW_DIR" ]; then
    [ -d "$RAW_DIR" ] || { echo "error: RAW_DIR=$RAW_DIR is not a folder" >&2; exit 1; }
    RAW=$(cd "$RAW_DIR" && pwd)
    say "raw data: $RAW (BraTS 2021 layout)"
else
    RAW=$OUT_DIR/raw
    say "synthetic data: $SUBJECTS subjects ($HEALTHY_FRACTION without tumour), preset $PRESET, seed $SEED"
    # shellcheck disable=SC2086  # SYNTH_SHAPE is three numbers
    "$PYTHON" scripts/make_synthetic_brats.py --output "$RAW" --num_subjects "$SUBJECTS" --preset "$PRESET" \
        --healthy_fraction "$HEALTHY_FRACTION" --seed "$SEED" --workers "$WORKERS" --shape $SYNTH_SHAPE
fi

# ---- 3. preprocessing (resumable: finished subjects are skipped) ----
say "preprocessing at ${IMAGE_SIZE}x${IMAGE_SIZE}"
"$PYTHON" scripts/preprocess.py --source "$RAW" --name brats --mod all --image_size "$IMAGE_SIZE" \
    --output "$OUT_DIR/data" --workers "$WORKERS" --min_val_lesion_subjects "$VAL_LESION_SUBJECTS"
if [ "$STOP_AFTER" = data ]; then say "data ready in $OUT_DIR/data (STOP_AFTER=data)"; exit 0; fi

# ---- 4. training (resumes from the latest checkpoint; skipped once the final one exists) ----
MODEL_DIR=$OUT_DIR/model
if "$PYTHON" -m guided_diffusion.quickstart trained --model_dir "$MODEL_DIR" --step "$TRAIN_STEPS" --ema_rate "$EMA_RATE"; then
    say "training: step $TRAIN_STEPS checkpoint found in $MODEL_DIR, skipped"
else
    say "training hae_v2_conservative: $TRAIN_STEPS steps of batch $TRAIN_BATCH (checkpoints every 250 steps)"
    OPENAI_LOGDIR=$MODEL_DIR "$PYTHON" scripts/train.py --data_dir "$OUT_DIR/data" --name brats "${MODEL_FLAGS[@]}" \
        --threshold 0.1 --dropout 0.0 --batch_size "$TRAIN_BATCH" --lr "$LR" --ema_rate "$EMA_RATE" \
        --max_steps "$TRAIN_STEPS" --total_epochs 100000 --save_interval 250 --log_interval 50 --seed "$SEED" \
        --sample_shape 4 4 "$IMAGE_SIZE" "$IMAGE_SIZE" --w "$W" --preview_steps 25 --num_workers 0 \
        --image_dir "$MODEL_DIR/images" --resume_checkpoint auto
fi

# ---- 5. AnoFPDM: validation (thresholds), test, metrics, panels (resumable per batch) ----
say "AnoFPDM: w=$W, $FORWARD_STEPS forward steps on the $RESPACING grid, modalities $MODALITY"
RESULTS=$OUT_DIR/results
# the model (and its EMA rate) comes from the training's config.json; the flags only for a folder without one
if [ -f "$MODEL_DIR/config.json" ]; then FROM_FLAGS=(); else FROM_FLAGS=("${MODEL_FLAGS[@]}" --ema_rate "$EMA_RATE"); fi
NUM_GPUS=1 CPU_PROCS=$EVAL_PROCS count_processes
MASTER_PORT=${EVAL_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export MASTER_PORT
if [ "$VISIBLE_GPUS" -eq 0 ] && [ "$NPROC" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
export OPENAI_LOGDIR=$RESULTS
# shellcheck disable=SC2086
launch scripts/translation_FPDM_hae_v2_conservative.py --name brats \
    --data_dir "$OUT_DIR/data" --model_dir "$MODEL_DIR" --model_num "$TRAIN_STEPS" --ema True \
    --w "$W" --forward_steps "$FORWARD_STEPS" --timestep_respacing "$RESPACING" --d_reverse True --null True \
    --modality $MODALITY --median_kernel "$MEDIAN_KERNEL" --quantile_a "$QUANTILE_A" --quantile_b "$QUANTILE_B" \
    --seed "$SEED" --batch_size "$EVAL_BATCH" --num_batches "$TEST_BATCHES" \
    --batch_size_val "$EVAL_BATCH" --num_batches_val "$VAL_BATCHES" --num_panels "$NUM_PANELS" \
    --image_dir "$RESULTS" "${FROM_FLAGS[@]}"

"$PYTHON" -m guided_diffusion.quickstart report --results "$RESULTS" --seconds "$(( $(date +%s) - START ))"
