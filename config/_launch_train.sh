#!/usr/bin/env bash
# Shared launcher of the training configs: config/run_train_*.sh set a few variables, then source this file.
# It builds upstream's production flags (model flags: config/_model_flags.sh), starts torchrun when GPUs are visible,
# several processes or several nodes are asked for, plain python for one CPU process, and passes the config's own
# arguments last, so they override:
#   bash config/run_train_brats_clf_free_guided.sh --max_steps 1000 --resume_checkpoint auto
# Every variable can be overridden from the environment, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 NUM_GPUS=2 BATCH_PER_GPU=16 bash config/run_train_brats_clf_free_guided_hae_v2.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash config/run_train_brats_clf_free_guided.sh    # on node0, and with
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash config/run_train_brats_clf_free_guided.sh    # on node1 (or SLURM:
#   sbatch config/slurm.sbatch config/run_train_brats_clf_free_guided.sh); DRY_RUN=1 prints the command.
# A new config sets UNET_VER, DATASET, MASTER_PORT, BATCH_PER_GPU and SCRIPT, optionally EXTRA_FLAGS=(...) (added
# before the command-line arguments) or its own MODEL_FLAGS=(...), then sources this file. The baselines' models
# (KIND anoddpm, clf_guided, classifier) are defined in config/_train_baselines.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- what the calling config sets (defaults = BraTS, v2) ----
UNET_VER=${UNET_VER:-v2}               # v2 | hae | hae_lite | hae_v2 | hae_v2_conservative
DATASET=${DATASET:-brats}              # brats | atlas
SCRIPT=${SCRIPT:-scripts/train.py}     # or an upstream-named alias such as scripts/train_hae_v2_conservative.py
MASTER_PORT=${MASTER_PORT:-29500}      # rendezvous port, really passed to torchrun (upstream's was ignored)
KIND=${KIND:-clf_free}                 # clf_free (AnoFPDM's model) | anoddpm | clf_guided | classifier (baselines)
DATA_ROOT=${DATA_ROOT:-./data}
LOG_ROOT=${LOG_ROOT:-./logs}
if [ "$KIND" != clf_free ]; then source config/_train_baselines.sh; fi
# Rows per process: the activation budget of upstream's hae_v2 configuration (14 rows x 2798 MiB) divided by each
# variant's activation memory per row (bench/memory_speed.py): v2 727 MiB -> 53 (48), hae_v2_conservative 561 -> 70
# (64); hae, hae_lite and hae_v2 need about as much as hae_v2 (14).
case "$UNET_VER" in v2) DEFAULT_BATCH=48 ;; hae_v2_conservative) DEFAULT_BATCH=64 ;; *) DEFAULT_BATCH=14 ;; esac
BATCH_PER_GPU=${BATCH_PER_GPU:-$DEFAULT_BATCH}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # GPUs to use (comma list); empty: none, train on the CPU
NUM_GPUS=${NUM_GPUS:-}                 # processes per node, one per GPU (empty: every visible GPU)
CPU_PROCS=${CPU_PROCS:-1}              # processes without GPU (1: plain python, no process group)
# (nodes, rendezvous, DRY_RUN, threads and NCCL: config/_common.sh)

# ---- data, output, schedule ----
if [ "$UNET_VER" = v2 ]; then SUFFIX=""; else SUFFIX="_$UNET_VER"; fi
if [ "$DATASET" = brats ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/BraTS21_training/preprocessed_data_all_00_128}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$LOG_ROOT/clf_free_guided$SUFFIX}   # what the translation configs read
    IN_CHANNELS=${IN_CHANNELS:-4}
    TOTAL_EPOCHS=${TOTAL_EPOCHS:-200}
elif [ "$DATASET" = atlas ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/ATLAS/preprocessed_data_t1_00_128}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$LOG_ROOT/atlas_clf_free_guided$SUFFIX}
    IN_CHANNELS=${IN_CHANNELS:-1}
    TOTAL_EPOCHS=${TOTAL_EPOCHS:-1000}
else
    echo "error: DATASET must be brats or atlas, got '$DATASET'" >&2
    exit 1
fi
SAVE_INTERVAL=${SAVE_INTERVAL:-5000}
THRESHOLD=${THRESHOLD:-0.1}            # classifier-free label-drop probability
DROPOUT=${DROPOUT:-0.1}
W=${W:-1 1.8 2 3}                      # guidance weights of the preview grids
export OPENAI_LOGDIR

source config/_common.sh       # the working directory is the repository root (cd above)
source config/_model_flags.sh
count_processes
BATCH_SIZE=${BATCH_SIZE:-$((BATCH_PER_GPU * NPROC * NNODES))}   # global: all processes of all nodes
if [ "$DRY_RUN" != 1 ]; then mkdir -p "$OPENAI_LOGDIR"; fi

if ! declare -p EXTRA_FLAGS >/dev/null 2>&1; then EXTRA_FLAGS=(); fi
if declare -F train_flags >/dev/null; then
    train_flags                        # a baseline's flags (config/_train_baselines.sh)
else
    model_flags
    # shellcheck disable=SC2206  # W is a space-separated list on purpose
    FLAGS=(
        "${MODEL_FLAGS[@]}"
        --name "$DATASET" --data_dir "$DATA_DIR" --ret_lab True --mixed True
        --w $W --threshold "$THRESHOLD" --dropout "$DROPOUT" --weight_decay 0 --noise_type gaussian
        --image_dir "$OPENAI_LOGDIR/images" --batch_size "$BATCH_SIZE" --ddpm_sampling False
        --total_epochs "$TOTAL_EPOCHS" --save_interval "$SAVE_INTERVAL" --sample_shape 12 "$IN_CHANNELS" "$IMAGE_SIZE" "$IMAGE_SIZE"
    )
fi
echo "training $KIND $UNET_VER on $DATASET: $NNODES node(s) x $NPROC process(es), global batch $BATCH_SIZE -> $OPENAI_LOGDIR" >&2
launch "$SCRIPT" "${FLAGS[@]}" "${EXTRA_FLAGS[@]}" "$@"
