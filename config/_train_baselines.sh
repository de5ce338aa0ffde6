#!/usr/bin/env bash
# The baselines' models in config/_launch_train.sh (sourced, not run, when KIND is not clf_free, once DATASET and
# LOG_ROOT are set), with upstream's flags (upstream config/run_train_{brats,ATLAS}_{anoddpm,clf_guided,clf}.sh):
#   KIND=anoddpm     AnoDDPM: unconditional v1 UNet on healthy slices only, NOISE_TYPE simplex (AnoDDPM (S)) or
#                    gaussian (AnoDDPM (G)), DDPM previews; batch 64, 1000 epochs, a checkpoint every 5000 steps
#   KIND=clf_guided  the class-conditional v1 DM the classifier guides (label always seen, learned variance, no label
#                    drop); batch 32 (ATLAS 64), a checkpoint every 10000 (ATLAS 5000) steps
#   KIND=classifier  the noisy-image classifier (scripts/train_classifier.py); batch 64, 250000 iterations, a
#                    checkpoint every 10000 (ATLAS 5000) steps
# Upstream split these batches over 2 GPUs (NUM_GPUS=2 BATCH_PER_GPU=32 gives its global batch of 64). The folders are
# where the translation configs look (config/_baseline_dirs.sh). It sets the defaults below and `train_flags`, which
# fills FLAGS for the launcher.
source config/_baseline_dirs.sh
if [ "$DATASET" = atlas ]; then LONG_SAVE=5000; else LONG_SAVE=10000; fi
DROPOUT=${DROPOUT:-0}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-1000}
case "$KIND" in
anoddpm)
    NOISE_TYPE=${NOISE_TYPE:-simplex}  # simplex: AnoDDPM (S); gaussian: AnoDDPM (G)
    NUM_CLASSES=${NUM_CLASSES:-0} CLASS_COND=${CLASS_COND:-False} LEARN_SIGMA=${LEARN_SIGMA:-False}
    BATCH_PER_GPU=${BATCH_PER_GPU:-64} SAVE_INTERVAL=${SAVE_INTERVAL:-5000}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$(baseline_model_dir anoddpm "$NOISE_TYPE")}
    RUN_FLAGS=(--ret_lab False --mixed False --n_unhealthy_patients 0 --noise_type "$NOISE_TYPE" --ddpm_sampling True)
    ;;
clf_guided)
    NUM_CLASSES=${NUM_CLASSES:-2} CLASS_COND=${CLASS_COND:-True} CLF_FREE=${CLF_FREE:-False} LEARN_SIGMA=${LEARN_SIGMA:-True}
    if [ "$DATASET" = atlas ]; then BATCH_PER_GPU=${BATCH_PER_GPU:-64}; else BATCH_PER_GPU=${BATCH_PER_GPU:-32}; fi
    SAVE_INTERVAL=${SAVE_INTERVAL:-$LONG_SAVE}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$(baseline_model_dir clf_guided)}
    RUN_FLAGS=(--ret_lab True --mixed True --noise_type gaussian --ddpm_sampling False)
    ;;
classifier)
    BATCH_PER_GPU=${BATCH_PER_GPU:-64} SAVE_INTERVAL=${SAVE_INTERVAL:-$LONG_SAVE}
    ITERATIONS=${ITERATIONS:-250000}
    OPENAI_LOGDIR=${OPENAI_LOGDIR:-$(baseline_model_dir classifier)}
    ;;
*)
    echo "error: KIND must be clf_free, anoddpm, clf_guided or classifier, got '$KIND'" >&2
    exit 1
    ;;
esac

# train_flags: FLAGS for the launcher (after config/_model_flags.sh is sourced and BATCH_SIZE is known). No
# --threshold: these models never drop their label.
train_flags() {
    if [ "$KIND" = classifier ]; then
        classifier_model_flags
        FLAGS=(
            "${MODEL_FLAGS[@]}" --name "$DATASET" --data_dir "$DATA_DIR" --image_dir "$OPENAI_LOGDIR/images"
            --batch_size "$BATCH_SIZE" --iterations "$ITERATIONS" --save_interval "$SAVE_INTERVAL"
        )
        return
    fi
    model_flags
    FLAGS=(
        "${MODEL_FLAGS[@]}" --name "$DATASET" --data_dir "$DATA_DIR" "${RUN_FLAGS[@]}" --dropout "$DROPOUT"
        --weight_decay 0 --image_dir "$OPENAI_LOGDIR/images" --batch_size "$BATCH_SIZE" --total_epochs "$TOTAL_EPOCHS"
        --save_interval "$SAVE_INTERVAL" --sample_shape 12 "$IN_CHANNELS" "$IMAGE_SIZE" "$IMAGE_SIZE"
    )
}
