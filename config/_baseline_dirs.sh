#!/usr/bin/env bash
# Where the baselines' models live, in one place (sourced, not run, once DATASET and LOG_ROOT are set): the training
# configs write there (config/_train_baselines.sh) and the translation configs read there (config/_baselines.sh).
# baseline_model_dir anoddpm NOISE_TYPE | clf_guided | classifier  ->  e.g. ./logs/anoddpm_simplex, ./logs/atlas_clf
baseline_model_dir() {
    local prefix=""
    if [ "$DATASET" = atlas ]; then prefix=atlas_; fi
    case "$1" in
    anoddpm) echo "$LOG_ROOT/${prefix}anoddpm_$2" ;;
    clf_guided) echo "$LOG_ROOT/${prefix}clf_guided" ;;
    classifier) echo "$LOG_ROOT/${prefix}clf" ;;
    *) echo "error: baseline_model_dir knows anoddpm, clf_guided, classifier; got '$1'" >&2; return 1 ;;
    esac
}
