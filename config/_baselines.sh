#!/usr/bin/env bash
# The reconstruction baselines in config/_launch_translation.sh (sourced, not run, once LOG_ROOT is set): where their
# models are, upstream's settings (AnoDDPM S=200 DDPM simplex; classifier-guided S=200, s=1000 BraTS / 500 ATLAS;
# DDIB S=450 w=1.1 BraTS / S=300 w=1.3 ATLAS), the value one run per entry of SWEEP takes, and `method_flags VALUE`.
# Their threshold is a grid search of the Dice on the pixel-labelled validation slices (VAL_SLICES, paper 1,000).
source config/_baseline_dirs.sh       # the folders the training configs write (baseline_model_dir)
LEGACY_DDIB=${LEGACY_DDIB:-False}      # ddib: True reproduces upstream's inversion (latent one level above S-1)
case "$METHOD" in
anoddpm)
    NOISE_TYPE=${NOISE_TYPE:-simplex}  # AnoDDPM (S); gaussian for AnoDDPM (G) (upstream: S=300 then)
    USE_DDPM=${USE_DDPM:-True}         # False: DDIM reconstruction
    MODEL_DIR=${MODEL_DIR:-$(baseline_model_dir anoddpm "$NOISE_TYPE")}
    NUM_CLASSES=${NUM_CLASSES:-0} CLASS_COND=${CLASS_COND:-False}  # the unconditional v1 UNet (upstream folders)
    SWEEP=${SWEEP:-${SAMPLE_STEPS:-200}} SWEEP_NAME=sample_steps RUN_TAG=${RUN_TAG:-${NOISE_TYPE}_ddpm$USE_DDPM}
    method_flags() { METHOD_FLAGS=(--sample_steps "$1" --noise_type "$NOISE_TYPE" --use_ddpm "$USE_DDPM"); }
    ;;
clf_guided)
    MODEL_DIR=${MODEL_DIR:-$(baseline_model_dir clf_guided)}
    CLF_DIR=${CLF_DIR:-$(baseline_model_dir classifier)} CLF_NUM=${CLF_NUM:-}  # the classifier (empty CLF_NUM: the latest)
    CLF_FREE=${CLF_FREE:-False} LEARN_SIGMA=${LEARN_SIGMA:-True}     # upstream's guided DM (upstream folders)
    if [ "$DATASET" = atlas ]; then DEFAULT_SCALE=500; else DEFAULT_SCALE=1000; fi
    SAMPLE_STEPS=${SAMPLE_STEPS:-200}
    SWEEP=${SWEEP:-${CLASSIFIER_SCALE:-$DEFAULT_SCALE}} SWEEP_NAME=classifier_scale RUN_TAG=${RUN_TAG:-$SAMPLE_STEPS}
    method_flags() {
        METHOD_FLAGS=(--classifier_scale "$1" --sample_steps "$SAMPLE_STEPS" --clf_dir "$CLF_DIR")
        if [ -n "$CLF_NUM" ]; then METHOD_FLAGS+=(--clf_num "$CLF_NUM"); fi
    }
    ;;
ddib)
    if [ "$DATASET" = atlas ]; then W=${W:-1.3} SAMPLE_STEPS=${SAMPLE_STEPS:-300}; else W=${W:-1.1} SAMPLE_STEPS=${SAMPLE_STEPS:-450}; fi
    SWEEP=${SWEEP:-$W} SWEEP_NAME=w RUN_TAG=${RUN_TAG:-$SAMPLE_STEPS}  # the AnoFPDM checkpoint folder (MODEL_DIR below)
    method_flags() { METHOD_FLAGS=(--w "$1" --sample_steps "$SAMPLE_STEPS" --legacy_ddib "$LEGACY_DDIB"); }
    ;;
*)
    echo "error: config/_baselines.sh knows METHOD anoddpm, clf_guided, ddib; got '$METHOD'" >&2
    exit 1
    ;;
esac
# what every baseline passes besides its own flags
baseline_flags() {
    # shellcheck disable=SC2206  # MODALITY is a space-separated list on purpose
    METHOD_FLAGS+=(--modality $MODALITY --use_weighted_sampler False --dynamic_clip False --save_data False)
}
