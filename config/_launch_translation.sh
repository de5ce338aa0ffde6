#!/usr/bin/env bash
# Shared launcher of the AnoFPDM translation configs (config/run_translation_*.sh set the variables, then
# source this file). Every variable can be overridden from the environment, e.g.
#   NUM_GPUS=2 CUDA_VISIBLE_DEVICES=0,1 W=2 bash config/run_translation_brats_fpdm_hae_v2.sh
# Runs on CPU (one process) when no GPU is visible. A killed run resumes when started again with the same
# OPENAI_LOGDIR (finished batches are kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- what the calling config sets (defaults = BraTS, v2) ----
VERSION=${VERSION:-v2}                 # v2 | hae | hae_lite | hae_v2 | hae_v2_conservative
DATASET=${DATASET:-brats}              # brats | atlas
PORT=${PORT:-12358}                    # rendezvous port of this config (multi-GPU)
BATCH_PER_GPU=${BATCH_PER_GPU:-10}     # slices per GPU per batch (memory bound; see bench/)
VAL_BATCH_PER_GPU=${VAL_BATCH_PER_GPU:-$BATCH_PER_GPU}

# ---- data, model, output ----
DATA_ROOT=${DATA_ROOT:-./data}
LOG_ROOT=${LOG_ROOT:-./logs}
if [ "$VERSION" = v2 ]; then SUFFIX=""; else SUFFIX="_$VERSION"; fi
if [ "$DATASET" = brats ]; then
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/BraTS21_training/preprocessed_data_all_00_128}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/clf_free_guided$SUFFIX}   # the brats train configs' OPENAI_LOGDIR
    IN_CHANNELS=${IN_CHANNELS:-4}
    MODALITY=${MODALITY:-"0 3"}        # FLAIR and T2
    W=${W:-2}                          # paper: w = 2 for BraTS
    TEST_SLICES=${TEST_SLICES:-10000}  # paper: 10,000 test and 1,000 validation slices
    VAL_SLICES=${VAL_SLICES:-1000}
    LAST_ONLY=${LAST_ONLY:-False}
else
    DATA_DIR=${DATA_DIR:-$DATA_ROOT/ATLAS/preprocessed_data_t1_00_128}
    MODEL_DIR=${MODEL_DIR:-$LOG_ROOT/atlas_clf_free_guided$SUFFIX}
    IN_CHANNELS=${IN_CHANNELS:-1}
    MODALITY=${MODALITY:-"0"}          # T1
    W=${W:-30}                         # paper: w = 30 for ATLAS
    TEST_SLICES=${TEST_SLICES:-4000}   # paper: 4,000 test and 1,000 validation slices
    VAL_SLICES=${VAL_SLICES:-1000}
    LAST_ONLY=${LAST_ONLY:-False}      # upstream's ATLAS config passed True (the "S_te" row); the paper's main row is False
fi
MODEL_NUM=${MODEL_NUM:-}               # empty: the latest checkpoint (paper: 210000 BraTS, 290000 ATLAS)
EMA=${EMA:-True}
FORWARD_STEPS=${FORWARD_STEPS:-600}
D_REVERSE=${D_REVERSE:-True}           # True: DDIM encoding ("AnoFPDM (DDIM)"), False: DDPM
SEED=${SEED:-0}
ROUND=${ROUND:-1}
NUM_CHANNELS=${NUM_CHANNELS:-128}
IMAGE_SIZE=${IMAGE_SIZE:-128}
# Upstream reproduction switches (see README): UGP_MODE=upstream LEGACY_DDIM_ENCODING=True
UGP_MODE=${UGP_MODE:-null}
LEGACY_DDIM_ENCODING=${LEGACY_DDIM_ENCODING:-False}
PRECISION=${PRECISION:-fp32}           # bf16 is faster on recent GPUs; fp32 reproduces best
EXTRA_FLAGS=${EXTRA_FLAGS:-}

# ---- devices ----
if [ -z "${NUM_GPUS:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then NUM_GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .); fi
    else
        NUM_GPUS=0
    fi
fi
NPROC=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-$PORT}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NCCL options (multi-GPU only). Defaults suit one machine with NVLink/PCIe P2P; uncomment when needed:
# export NCCL_P2P_DISABLE=1        # consumer GPUs or VMs where peer-to-peer hangs
# export NCCL_IB_DISABLE=1         # no InfiniBand (avoids a slow probe on some clusters)
# export NCCL_SOCKET_IFNAME=eth0   # pick the network interface when several exist
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a crashed rank stops the others

# ---- batch counts: global batch = per-GPU batch x processes ----
BATCH_SIZE=$(( BATCH_PER_GPU * NPROC ))
BATCH_SIZE_VAL=$(( VAL_BATCH_PER_GPU * NPROC ))
NUM_BATCHES=${NUM_BATCHES:-$(( (TEST_SLICES + BATCH_SIZE - 1) / BATCH_SIZE ))}        # -1: whole test split
NUM_BATCHES_VAL=${NUM_BATCHES_VAL:-$(( (VAL_SLICES + BATCH_SIZE_VAL - 1) / BATCH_SIZE_VAL ))}

if [ ! -d "$MODEL_DIR" ]; then
    echo "error: MODEL_DIR $MODEL_DIR does not exist (train first, or set MODEL_DIR=...)" >&2
    exit 1
fi
if [ ! -d "$DATA_DIR" ]; then
    echo "error: DATA_DIR $DATA_DIR does not exist (run config/run_preprocess.sh, or set DATA_DIR=...)" >&2
    exit 1
fi

if [ "$VERSION" = v2 ]; then HAE_FLAGS="--unet_ver v2"; else HAE_FLAGS="--unet_ver $VERSION --use_hae True"; fi
MODEL_FLAGS="$HAE_FLAGS --image_size $IMAGE_SIZE --num_classes 2 --in_channels $IN_CHANNELS --num_channels $NUM_CHANNELS
    --attention_resolutions 32,16,8 --learn_sigma False --dropout 0.0"
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"

for w in $W; do
    export OPENAI_LOGDIR=${OPENAI_LOGDIR_OVERRIDE:-$LOG_ROOT/logs_${DATASET}_aba$SUFFIX/translation_fpdm${SUFFIX}_${w}_${MODEL_NUM:-latest}_${FORWARD_STEPS}_${ROUND}_x1}
    mkdir -p "$OPENAI_LOGDIR"
    echo "AnoFPDM $VERSION on $DATASET: w=$w, $NPROC process(es), batch $BATCH_SIZE x $NUM_BATCHES (val $BATCH_SIZE_VAL x $NUM_BATCHES_VAL) -> $OPENAI_LOGDIR"
    # shellcheck disable=SC2086
    ARGS="--name $DATASET --data_dir $DATA_DIR --model_dir $MODEL_DIR --image_dir $OPENAI_LOGDIR
        ${MODEL_NUM:+--model_num $MODEL_NUM} --ema $EMA --w $w --forward_steps $FORWARD_STEPS --d_reverse $D_REVERSE
        --null True --dynamic_clip False --modality $MODALITY --seed $SEED --use_weighted_sampler False
        --batch_size $BATCH_SIZE --num_batches $NUM_BATCHES --batch_size_val $BATCH_SIZE_VAL --num_batches_val $NUM_BATCHES_VAL
        --last_only $LAST_ONLY --subset_interval -1 --t_e_ratio 1 --use_gradient_sam False --use_gradient_para_sam False
        --ugp_mode $UGP_MODE --legacy_ddim_encoding $LEGACY_DDIM_ENCODING --precision $PRECISION --save_data False
        $MODEL_FLAGS $DIFFUSION_FLAGS $EXTRA_FLAGS"
    if [ "$NPROC" -gt 1 ]; then
        # shellcheck disable=SC2086
        torchrun --nproc-per-node "$NPROC" --nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
            ./scripts/translation_FPDM.py $ARGS
    else
        # shellcheck disable=SC2086
        python ./scripts/translation_FPDM.py $ARGS
    fi
done
