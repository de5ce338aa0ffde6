#!/usr/bin/env bash
# One-command AnoFPDM demo on a fresh machine (CPU; a visible GPU is used automatically): installs the project when
# it does not import (the pinned torch==TORCH_VERSION first when torch is missing), then runs `anofpdm quickstart`:
# synthetic BraTS-like subjects, preprocessing to 32-px slices, a small hae_v2_conservative model, AnoFPDM on the
# validation and test slices, Dice / IoU / AUPRC and pictures. Everything goes under OUT_DIR (default
# ./runs/quickstart); rerun the same command after an interruption and every stage continues. Settings: the
# `quickstart` preset (`anofpdm presets quickstart`); each variable below that is set becomes the quickstart's flag of
# the same name in lower case (`anofpdm quickstart --help`), e.g.
#   OUT_DIR=/tmp/qs TRAIN_STEPS=3000 SYNTH_PRESET=small bash config/run_quickstart.sh
#   RAW_DIR=/data/BraTS2021_Training_Data bash config/run_quickstart.sh          # your own scans
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # the pinned wheel installed when torch is missing
INSTALL=${INSTALL:-auto}               # auto: pip-install when guided_diffusion/nilearn do not import; never: skip
if [ "$INSTALL" != never ] && ! (cd / && "$PYTHON" -c "import guided_diffusion.commands, nilearn") >/dev/null 2>&1; then
    echo "=== installing the project (pip install -e .[demo])" >&2
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m pip install "torch==$TORCH_VERSION"  # the pinned build first: a bare "torch" may pull a multi-GB one
    fi
    "$PYTHON" -m pip install -e "$REPO[demo]"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
GIVEN_MASTER_PORT=${MASTER_PORT:-}
source "$REPO/config/_common.sh"       # CPU thread policy (OMP_WAIT_POLICY=PASSIVE unless set)
# The evaluation's processes take a free port of their own unless you set MASTER_PORT: two quickstarts side by side
# must not both claim _common.sh's default 29500.
if [ -z "$GIVEN_MASTER_PORT" ]; then unset MASTER_PORT; fi
ARGS=(--output "${OUT_DIR:-runs/quickstart}")
for var in RAW_DIR SUBJECTS HEALTHY_FRACTION SYNTH_PRESET SYNTH_SHAPE SEED VAL_LESION_SUBJECTS IMAGE_SIZE WORKERS \
    EVAL_PROCS STOP_AFTER TRAIN_STEPS NUM_CHANNELS CHANNEL_MULT ATTENTION_RESOLUTIONS BATCH_SIZE LR EMA_RATE W \
    TIMESTEP_RESPACING FORWARD_STEPS MODALITY EVAL_BATCH MEDIAN_KERNEL QUANTILE_A QUANTILE_B NUM_BATCHES_VAL \
    NUM_BATCHES NUM_PANELS; do
    if [ -n "${!var:-}" ]; then
        read -r -a words <<< "${!var}"
        ARGS+=("--$(echo "$var" | tr '[:upper:]' '[:lower:]')" "${words[@]}")
    fi
done
# the earlier names of some of these variables
for pair in PRESET:synth_preset RESPACING:timestep_respacing ATTENTION:attention_resolutions TRAIN_BATCH:batch_size \
    VAL_BATCHES:num_batches_val TEST_BATCHES:num_batches; do
    var=${pair%%:*}
    if [ -n "${!var:-}" ]; then ARGS+=("--${pair#*:}" "${!var}"); fi
done
exec "$PYTHON" -m guided_diffusion quickstart "${ARGS[@]}" "$@"
