#!/usr/bin/env bash
# How long whole-volume segmentation (scripts/segment.py) takes for BraTS-sized subjects (240x240x155) with the
# quickstart's model and AnoFPDM settings (hae_v2_conservative at 32 px; w=2, 30 forward steps on the ddim100 grid,
# FLAIR + T2, 32 slices per forward). Run by hand:
#   OMP_NUM_THREADS=1 bash bench/segment_subject.sh            # everything under runs/segment_bench
#   MODEL_DIR=runs/quickstart/model bash bench/segment_subject.sh   # a trained quickstart model instead
# Without MODEL_DIR it trains the quickstart's architecture for TRAIN_STEPS steps on SUBJECTS synthetic subjects:
# the time per subject does not depend on the weights, only on the architecture and the settings.
# Prints the seconds per subject (from <id>_segmentation.json: preparation, all forwards, writing).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/runs/segment_bench}
SUBJECTS=${SUBJECTS:-3}
SEGMENT_SUBJECTS=${SEGMENT_SUBJECTS:-$SUBJECTS}   # segment the first N of them
TRAIN_STEPS=${TRAIN_STEPS:-20}
BATCH=${BATCH:-32}
PYTHON=${PYTHON:-python}
MODEL_FLAGS=(--unet_ver hae_v2_conservative --use_hae True --image_size 32 --in_channels 4 --num_classes 2
             --class_cond True --clf_free True --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2
             --attention_resolutions 8 --learn_sigma False --diffusion_steps 1000 --noise_schedule linear
             --rescale_timesteps False)

"$PYTHON" -m guided_diffusion.quickstart synth --output "$OUT/raw" --num_subjects "$SUBJECTS" --seed 1 --workers 1
if [ -z "${MODEL_DIR:-}" ]; then
    MODEL_DIR=$OUT/model
    "$PYTHON" scripts/preprocess.py --source "$OUT/raw" --image_size 32 --output "$OUT/data" --workers 1
    if [ ! -f "$MODEL_DIR/ema_0.995_$(printf %06d "$TRAIN_STEPS").pt" ]; then
        OPENAI_LOGDIR=$MODEL_DIR "$PYTHON" scripts/train.py --data_dir "$OUT/data" --name brats "${MODEL_FLAGS[@]}" \
            --threshold 0.1 --batch_size 16 --lr 3e-4 --ema_rate 0.995 --max_steps "$TRAIN_STEPS" \
            --total_epochs 100000 --save_interval "$TRAIN_STEPS" --log_interval 10 --sample_shape 1 4 32 32 --preview_steps 2 \
            --w 2 --num_workers 0 --resume_checkpoint auto
    fi
fi
# fixed hyper-parameters: the point is the time, not the quality (a validation pass is timed by the quickstart)
echo '{"thr_01": 0.99, "diff_max": [0.01, 0.01], "source": "bench"}' > "$OUT/hyperparams.json"
SEGMENT_MODEL_FLAGS=("${MODEL_FLAGS[@]}")
if [ -f "$MODEL_DIR/config.json" ]; then SEGMENT_MODEL_FLAGS=(); fi  # training recorded the model
mapfile -t INPUTS < <(find "$OUT/raw" -mindepth 1 -maxdepth 1 -type d | sort | head -n "$SEGMENT_SUBJECTS")
START=$(date +%s)
"$PYTHON" scripts/segment.py --input "${INPUTS[@]}" --output "$OUT/segment" --model_dir "$MODEL_DIR" --ema True \
    --ema_rate 0.995 --w 2 --forward_steps 30 --timestep_respacing ddim100 --d_reverse True --null True \
    --modality 0 3 --batch_size "$BATCH" --hyperparams_file "$OUT/hyperparams.json" --resume False \
    --progress False "${SEGMENT_MODEL_FLAGS[@]}"
echo "wall $(( $(date +%s) - START )) s for ${#INPUTS[@]} subject(s) (model loading included)"
"$PYTHON" - "$OUT/segment" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*_segmentation.json")):
    r = json.loads(p.read_text())
    t = r.get("timing", {})
    print(f"{r['id']}: {r['seconds']:.1f} s wall, {r['slices']['n_kept']} slices of {r['grid']['shape']}; "
          + ", ".join(f"{k} {w:.1f} s wall / {c:.1f} s CPU" for k, (w, c) in t.items()))
EOF
