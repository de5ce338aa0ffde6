#!/usr/bin/env bash
# Preprocess raw volumes into the slice format (`anofpdm preprocess`: npy_{train,val,test}/patient_<P>/slice_<z>.npz).
# Resumable: rerun after an interruption and finished subjects are skipped. Each variable below that is set becomes the
# flag of the same name in lower case; extra arguments are passed last, e.g.
#   SOURCE=./data/ATLAS NAME=atlas MOD=t1 OUTPUT=./data/atlas128 bash config/run_preprocess.sh --workers 8
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
source "$REPO/config/_common.sh"       # CPU thread policy
ARGS=()
for var in SOURCE NAME MOD FIRST LAST IMAGE_SIZE WORKERS OUTPUT MIN_VAL_LESION_SUBJECTS ORIENTATION; do
    if [ -n "${!var:-}" ]; then ARGS+=("--$(echo "$var" | tr '[:upper:]' '[:lower:]')" "${!var}"); fi
done
run "$PYTHON" -m guided_diffusion preprocess "${ARGS[@]}" "$@"
