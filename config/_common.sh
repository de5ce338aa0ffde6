#!/usr/bin/env bash
# Shared by config/_launch_train.sh and config/_launch_translation.sh (sourced, not run):
# GPU/process counting, NCCL defaults, and starting one process (python) or several (torchrun).

# NCCL (multi-GPU only). Override from the environment:
#   NCCL_P2P_DISABLE=1  when a run hangs at start-up or at the first all-reduce because the GPUs have no working
#                       peer-to-peer path (many consumer cards, e.g. RTX 40xx; VMs or containers with IOMMU).
#   NCCL_IB_DISABLE=1   on one machine, or where InfiniBand is missing or misconfigured (stops NCCL probing it).
#   NCCL_DEBUG=INFO     to see what NCCL does when a run hangs or fails (WARN prints only problems).
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Sets VISIBLE_GPUS and NPROC from CUDA_VISIBLE_DEVICES, NUM_GPUS (empty: every visible GPU) and CPU_PROCS.
count_processes() {
    VISIBLE_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    if [ "$VISIBLE_GPUS" -gt 0 ]; then
        NPROC=${NUM_GPUS:-$VISIBLE_GPUS}
        if [ "$NPROC" -gt "$VISIBLE_GPUS" ]; then
            echo "NUM_GPUS=$NPROC but only $VISIBLE_GPUS GPU(s) are visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})" >&2
            exit 1
        fi
    else
        NPROC=${CPU_PROCS:-1}
        echo "no GPU visible: running on the CPU with $NPROC process(es)" >&2
    fi
}

# launch SCRIPT ARGS...: torchrun on MASTER_ADDR:MASTER_PORT when several processes or GPUs, else plain python.
launch() {
    if [ "$NPROC" -gt 1 ] || [ "$VISIBLE_GPUS" -gt 0 ]; then
        (set -x; "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
            --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@")
    else
        (set -x; "$PYTHON" "$@")
    fi
}
