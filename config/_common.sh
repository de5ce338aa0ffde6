#!/usr/bin/env bash
# Shared by the launchers (config/_launch_train.sh, config/_launch_translation.sh) and the quickstart (sourced, not
# run): CPU threads, NCCL defaults, GPU/process counting, multi-node settings, and starting one process (python) or
# several (torchrun), or printing the command (DRY_RUN=1).

# ---- CPU threads: OpenMP reads the wait policy when torch loads, so it is set before Python starts ----
# PASSIVE: idle OpenMP threads sleep instead of spinning. On a CPU shared with other work spinning threads fight the
# other processes: a 2-thread training step took 10-23 s instead of 1.7 s (bench/cpu_threads.py,
# docs/launchers.md). Each
# Python entry point then uses the free cores (cores minus the load average) unless OMP_NUM_THREADS is set
# (guided_diffusion.runtime.configure_threads). Set OMP_WAIT_POLICY / OMP_NUM_THREADS yourself to override.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# ---- NCCL (multi-GPU only). Override from the environment:
#   NCCL_P2P_DISABLE=1  when a run hangs at start-up or at the first all-reduce because the GPUs have no working
#                       peer-to-peer path (many consumer cards, e.g. RTX 40xx; VMs or containers with IOMMU).
#   NCCL_IB_DISABLE=1   on one machine, or where InfiniBand is missing or misconfigured (stops NCCL probing it);
#                       the default on one node. Several nodes: 0 (use InfiniBand where it exists).
#   NCCL_DEBUG=INFO     to see what NCCL does when a run hangs or fails (WARN prints only problems).
#   NCCL_SOCKET_IFNAME  the network interface between nodes when NCCL picks a wrong one (e.g. ib0, eth0).

# ---- Nodes and rendezvous (torchrun's static rendezvous; every node runs the same command) ----
NNODES=${NNODES:-1}                    # machines taking part
NODE_RANK=${NODE_RANK:-0}              # this machine's index, 0 .. NNODES-1 (SLURM: $SLURM_NODEID)
MASTER_ADDR=${MASTER_ADDR:-localhost}  # host of node 0, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}      # a free port on node 0 (each config sets its own default)
DRY_RUN=${DRY_RUN:-0}                  # 1: print the command instead of running it
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
if [ "$NNODES" -gt 1 ]; then export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}; else export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}; fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export MASTER_ADDR MASTER_PORT
PYTHON=${PYTHON:-python}

# Sets VISIBLE_GPUS and NPROC (processes on this node) from CUDA_VISIBLE_DEVICES, NUM_GPUS (empty: every visible
# GPU) and CPU_PROCS. With DRY_RUN=1 a given NUM_GPUS is taken as is (to print a cluster's command anywhere).
count_processes() {
    if [ "$DRY_RUN" = 1 ] && [ -n "${NUM_GPUS:-}" ]; then
        VISIBLE_GPUS=$NUM_GPUS NPROC=$NUM_GPUS
        return
    fi
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

# run COMMAND...: run it (echoed to stderr), or with DRY_RUN=1 print it, shell-quoted, on stdout.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        local arg words=()
        for arg in "$@"; do
            if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then words+=("$arg"); else words+=("$(printf '%q' "$arg")"); fi
        done
        echo "${words[*]}"
    else
        (set -x; "$@")
    fi
}

# launch SCRIPT ARGS...: torchrun on MASTER_ADDR:MASTER_PORT (NNODES nodes, NPROC processes each) when there are
# several processes, several nodes or a GPU; plain python for one CPU process.
launch() {
    if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ] || [ "$VISIBLE_GPUS" -gt 0 ]; then
        run "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
            --nproc-per-node "$NPROC" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
    else
        run "$PYTHON" "$@"
    fi
}
