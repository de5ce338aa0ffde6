#!/usr/bin/env bash
# Shared launcher of the run_train_* / run_translation_* / run_segment configs (sourced, not run). A config sets
#   COMMAND      train | train-classifier | evaluate | segment
#   PRESET       the settings (guided_diffusion/presets.py; `anofpdm presets NAME` shows them)
#   MASTER_PORT  its own rendezvous port
# then sources this file, which runs `anofpdm COMMAND --preset PRESET` on every visible GPU (torchrun), on several
# CPU processes (CPU_PROCS) or nodes (NNODES, config/_common.sh), else in one plain python process. The settings live
# in the preset; a variable below that is set becomes the flag of the same name in lower case (DATA_DIR=x ->
# --data_dir x, the value kept whole; OUT_DIR, OUTPUT or OPENAI_LOGDIR -> --output; BATCH_PER_GPU -> --batch_per_process;
# the lists MODALITY and INPUT as said below), and the config's own arguments come last, so every flag overrides:
#   DATA_DIR=data/brats128 bash config/run_train_brats_clf_free_guided_hae_v2_conservative.sh --max_steps 1000
#   CUDA_VISIBLE_DEVICES=0,1 W="1 2 3" bash config/run_translation_brats_fpdm.sh      # one run per guidance weight
#   DRY_RUN=1 bash config/run_translation_brats_fpdm.sh                               # print the command
# Relative paths are the caller's (the current folder's); nothing is written into the checkout unless asked.
set -euo pipefail
: "${COMMAND:?a config sets COMMAND}" "${PRESET:?a config sets PRESET}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the package, installed or not
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # GPUs to use (comma list); empty: none, run on the CPU
NUM_GPUS=${NUM_GPUS:-}                 # processes per node, one per GPU (empty: every visible GPU)
CPU_PROCS=${CPU_PROCS:-1}              # processes without GPU (1: plain python, no process group)
source "$REPO/config/_common.sh"       # threads, NCCL, nodes, count_processes, launch, DRY_RUN

FLAGS=()
OUT_DIR=${OUT_DIR:-${OUTPUT:-${OPENAI_LOGDIR:-}}}   # the run's folder (OUTPUT, OPENAI_LOGDIR: the earlier names)
if [ -n "$OUT_DIR" ]; then FLAGS+=(--output "$OUT_DIR"); fi
if [ -n "${BATCH_PER_GPU:-}" ]; then FLAGS+=(--batch_per_process "$BATCH_PER_GPU"); fi
# variables that become the flag of the same name, one value each (kept whole: a path may hold spaces)
for var in DATA_DIR MODEL_DIR MODEL_NUM EMA CLF_DIR CLF_NUM SEED PRECISION BATCH_SIZE BATCH_SIZE_VAL NUM_BATCHES \
    NUM_BATCHES_VAL TEST_SLICES VAL_SLICES FORWARD_STEPS SAMPLE_STEPS CLASSIFIER_SCALE D_REVERSE LAST_ONLY UGP_MODE \
    LEGACY_DDIM_ENCODING LEGACY_DDIB USE_DDPM NOISE_TYPE TOTAL_EPOCHS SAVE_INTERVAL THRESHOLD DROPOUT \
    MAX_STEPS ITERATIONS HYPERPARAMS_FILE MOD; do
    if [ -n "${!var:-}" ]; then FLAGS+=("--$(echo "$var" | tr '[:upper:]' '[:lower:]')" "${!var}"); fi
done
# lists: MODALITY="0 3" (space-separated); INPUT, the folders to segment: one per line (INPUT=$'a b\nc'), or one
# line that is a single existing path (spaces included), else space-separated paths (INPUT="a b": a and b)
if [ -n "${MODALITY:-}" ]; then read -r -a words <<< "$MODALITY"; FLAGS+=(--modality "${words[@]}"); fi
if [ -n "${INPUT:-}" ]; then
    if [[ "$INPUT" == *$'\n'* ]]; then
        words=()
        while IFS= read -r line; do if [ -n "$line" ]; then words+=("$line"); fi; done <<< "$INPUT"
    elif [ -e "$INPUT" ]; then
        words=("$INPUT")
    else
        read -r -a words <<< "$INPUT"
    fi
    FLAGS+=(--input "${words[@]}")
fi

count_processes
# one run per value of W (AnoFPDM's and DDIB's guidance weight), each into <output>/w_<value> when there are several
read -r -a SWEEP <<< "${W:-}"
if [ "${#SWEEP[@]}" -eq 0 ]; then SWEEP=(""); fi
for w in "${SWEEP[@]}"; do
    RUN=("${FLAGS[@]}")
    if [ -n "$w" ]; then
        RUN+=(--w "$w")
        if [ "${#SWEEP[@]}" -gt 1 ]; then RUN+=(--output "${OUT_DIR:-logs/$PRESET}/w_$w"); fi
    fi
    echo "anofpdm $COMMAND --preset $PRESET${w:+ --w $w}: $NNODES node(s) x $NPROC process(es)" >&2
    launch -m guided_diffusion "$COMMAND" --preset "$PRESET" "${RUN[@]}" "$@"
done
