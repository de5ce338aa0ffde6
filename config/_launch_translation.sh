#!/usr/bin/env bash
# Shared launcher of the anomaly-segmentation configs: config/run_translation_*.sh set a few variables, then source
# this file. It starts torchrun when GPUs are visible, several processes or several nodes are asked for, plain
# python for one CPU process, and passes the config's own arguments last, so they override:
#   bash config/run_translation_brats_fpdm.sh --num_batches 2 --forward_steps 300
# The model comes from MODEL_DIR/config.json (written by training); only a folder without one (upstream
# checkpoints) gets the model flags of config/_model_flags.sh. Every variable can be overridden, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 W="1 2 3" MODEL_NUM=210000 bash config/run_translation_brats_fpdm_hae_v2.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash config/run_translation_brats_fpdm.sh   # one command per node
#   DRY_RUN=1 bash config/run_translation_brats_fpdm.sh                                 # print the command
# (SLURM: sbatch config/slurm.sbatch config/run_translation_brats_fpdm.sh). The output folder must be shared by
# the nodes. A killed run resumes when started again with the same OPENAI_LOGDIR (finished batches are kept).
# A new method's config sets METHOD, SCRIPT, MASTER_PORT, BATCH_PER_GPU and defines `method_flags VALUE` (filling the
# array METHOD_FLAGS for one value of SWEEP, by default the guidance weights W; the default below is AnoFPDM's), then
# sources this file. The baselines (METHOD anoddpm, clf_guided, ddib) are defined in config/_baselines.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- what the calling config sets (defaults = BraTS, v2, AnoFPDM) ----
UNET_VER=${UNET_VER:-v2}               # v2 | hae | hae_lite | hae_v2 | hae_v2_conservative (the training folder)
DATASET=${DATASET:-brats}              # brats | atlas
METHOD=${METHOD:-fpdm}                 # names the output folder
SCRIPT=${SCRIPT:-scripts/translation_FPDM.py}
MASTER_PORT=${MASTER_PORT:-12358}      # rendezvous port, really passed to torchrun
# Test slices per process and batch: the inference budget of hae_v2 at 14 slices (14 x 2784 MiB) divided by each
# variant's cond+null forward peak per slice (bench/memory_speed.py): v2 112 MiB -> 348 (256), hae_v2_conservative
# 160 -> 243 (224); hae, hae_lite and hae_v2 peak at about 2784 MiB (14).
# v1 (the baselines' UNet, plain self-attention, one forward per step) is taken as v2 (not benchmarked).
case "$UNET_VER" in v1 | v2) DEFAULT_BATCH=256 ;; hae_v2_conservative) DEFAULT_BATCH=224 ;; *) DEFAULT_BATCH=14 ;; esac
BATCH_PER_GPU=${BATCH_PER_GPU:-$DEFAULT_BATCH}
VAL_BATCH_PER_GPU=${VAL_BATCH_PER_GPU:-$BATCH_PER_GPU}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # GPUs to use (comma list); empty: none, run on the CPU
NUM_GPUS=${NUM_GPUS:-}                 # processes per node, one per GPU (empty: every visible GPU)
CPU_PROCS=${CPU_PROCS:-1}              # processes without GPU (1: plain python, no process group)
# (nodes, rendezvous, DRY_RUN, threads and NCCL: config/_common.sh)

# ---- data, model, output ----
DATA_ROOT=${DATA_ROOT:-./data}
LOG_ROOT=${LOG_ROOT:-./logs}
if [ "$UNET_VER" = v2 ] || [ "$UNET_VER" = v1 ]; then SUFFIX=""; else SUFFIX="_$UNET_VER"; fi
case "$METHOD" in anoddpm | clf_guided | ddib) source config/_baselines.sh ;; esac
if [ "$DATASET" = brats ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/BraTS21_training/preprocessed_data_all_00_128}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/clf_free_guided$SUFFIX}          # the training configs' OPENAI_LOGDIR
    IN_CHANNELS=${IN_CHANNELS:-4}
    MODALITY=${MODALITY:-0 3}          # FLAIR and T2
    W=${W:-2}                          # paper: w = 2 (several values sweep: W="1 2 3")
    TEST_SLICES=${TEST_SLICES:-10000}  # paper: 10,000 test and 1,000 validation slices
    VAL_SLICES=${VAL_SLICES:-1000}
elif [ "$DATASET" = atlas ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/ATLAS/preprocessed_data_t1_00_128}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/atlas_clf_free_guided$SUFFIX}
    IN_CHANNELS=${IN_CHANNELS:-1}
    MODALITY=${MODALITY:-0}            # T1
    W=${W:-30}                         # paper: w = 30
    TEST_SLICES=${TEST_SLICES:-4000}   # paper: 4,000 test and 1,000 validation slices
    VAL_SLICES=${VAL_SLICES:-1000}
else
    echo "error: DATASET must be brats or atlas, got '$DATASET'" >&2
    exit 1
fi
MODEL_NUM=${MODEL_NUM:-}               # empty: the latest checkpoint (paper: 210000 BraTS, 290000 ATLAS)
EMA=${EMA:-True}
FORWARD_STEPS=${FORWARD_STEPS:-600}
D_REVERSE=${D_REVERSE:-True}           # True: DDIM encoding ("AnoFPDM (DDIM)"); False: DDPM
LAST_ONLY=${LAST_ONLY:-False}          # True: the "S_te" rows (upstream's ATLAS config passed True)
SEED=${SEED:-0}
ROUND=${ROUND:-1}
UGP_MODE=${UGP_MODE:-null}             # upstream: healthy-conditional UGP (reproduces old numbers)
LEGACY_DDIM_ENCODING=${LEGACY_DDIM_ENCODING:-False}  # True: upstream's off-by-one DDIM encoding
PRECISION=${PRECISION:-fp32}           # bf16 is faster on recent GPUs
OUT_DIR=${OUT_DIR:-}                   # results folder (OPENAI_LOGDIR of the run); empty: one per w under $LOG_ROOT
SWEEP=${SWEEP:-$W}                     # one run per value (AnoFPDM: the guidance weights W)
SWEEP_NAME=${SWEEP_NAME:-w}

source config/_common.sh       # the working directory is the repository root (cd above)
source config/_model_flags.sh

for dir_var in MODEL_DIR DATA_DIR; do
    if [ ! -d "${!dir_var}" ]; then
        if [ "$DRY_RUN" = 1 ]; then
            echo "note: $dir_var=${!dir_var} is not a folder (dry run: printing the command anyway)" >&2
        else
            echo "error: $dir_var=${!dir_var} is not a folder (train / preprocess first, or set $dir_var=...)" >&2
            exit 1
        fi
    fi
done
if [ -f "$MODEL_DIR/config.json" ]; then
    MODEL_FLAGS=()                     # the model is built from config.json
else
    model_flags                        # upstream checkpoints: the model flags of this config
fi

count_processes
# Batch sizes are global (all processes together), so the slices evaluated do not depend on the GPU count.
BATCH_SIZE=${BATCH_SIZE:-$((BATCH_PER_GPU * NPROC * NNODES))}
BATCH_SIZE_VAL=${BATCH_SIZE_VAL:-$((VAL_BATCH_PER_GPU * NPROC * NNODES))}
NUM_BATCHES=${NUM_BATCHES:-$(((TEST_SLICES + BATCH_SIZE - 1) / BATCH_SIZE))}            # -1: whole test split
NUM_BATCHES_VAL=${NUM_BATCHES_VAL:-$(((VAL_SLICES + BATCH_SIZE_VAL - 1) / BATCH_SIZE_VAL))}

# AnoFPDM's flags for guidance weight $1 (a config for another method defines its own method_flags first).
if ! declare -F method_flags >/dev/null; then
    method_flags() {
        # shellcheck disable=SC2206  # MODALITY is a space-separated list on purpose
        METHOD_FLAGS=(
            --w "$1" --forward_steps "$FORWARD_STEPS" --d_reverse "$D_REVERSE" --null True --dynamic_clip False
            --modality $MODALITY --use_weighted_sampler False --last_only "$LAST_ONLY" --subset_interval -1
            --t_e_ratio 1 --use_gradient_sam False --use_gradient_para_sam False --save_data False
            --ugp_mode "$UGP_MODE" --legacy_ddim_encoding "$LEGACY_DDIM_ENCODING"
        )
    }
fi

for w in $SWEEP; do
    if [ -n "$OUT_DIR" ] && [ "$(echo "$SWEEP" | wc -w)" -gt 1 ]; then
        OPENAI_LOGDIR=$OUT_DIR/${SWEEP_NAME}_$w
    else
        OPENAI_LOGDIR=${OUT_DIR:-$LOG_ROOT/logs_${DATASET}_aba$SUFFIX/translation_${METHOD}${SUFFIX}_${w}_${MODEL_NUM:-latest}_${RUN_TAG:-$FORWARD_STEPS}_${ROUND}_x1}
    fi
    export OPENAI_LOGDIR
    if [ "$DRY_RUN" != 1 ]; then mkdir -p "$OPENAI_LOGDIR"; fi
    method_flags "$w"
    if declare -F baseline_flags >/dev/null; then baseline_flags; fi
    FLAGS=(
        --name "$DATASET" --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR" --image_dir "$OPENAI_LOGDIR"
        --ema "$EMA" --seed "$SEED" --precision "$PRECISION"
        --batch_size "$BATCH_SIZE" --num_batches "$NUM_BATCHES"
        --batch_size_val "$BATCH_SIZE_VAL" --num_batches_val "$NUM_BATCHES_VAL"
        "${METHOD_FLAGS[@]}" "${MODEL_FLAGS[@]}"
    )
    if [ -n "$MODEL_NUM" ]; then FLAGS+=(--model_num "$MODEL_NUM"); fi
    echo "$METHOD ($UNET_VER) on $DATASET, $SWEEP_NAME=$w: $NNODES node(s) x $NPROC process(es), test $BATCH_SIZE x $NUM_BATCHES, val $BATCH_SIZE_VAL x $NUM_BATCHES_VAL -> $OPENAI_LOGDIR" >&2
    launch "$SCRIPT" "${FLAGS[@]}" "$@"
done
