#!/usr/bin/env bash
# The model and diffusion flags, in one place (sourced, not run): training, translation (for checkpoint folders
# without config.json) and the quickstart build them here. Defaults are upstream's production model; every one
# can be overridden from the environment or by the calling script before `model_flags` runs.
UNET_VER=${UNET_VER:-v2}                              # v2 | hae | hae_lite | hae_v2 | hae_v2_conservative | v1
IMAGE_SIZE=${IMAGE_SIZE:-128}
IN_CHANNELS=${IN_CHANNELS:-4}                         # BraTS 4 (flair, t1, t1ce, t2), ATLAS 1
NUM_CLASSES=${NUM_CLASSES:-2}                         # healthy / unhealthy
CLASS_COND=${CLASS_COND:-True}                        # False with NUM_CLASSES=0: unconditional (AnoDDPM)
CLF_FREE=${CLF_FREE:-True}                            # False: plain class-conditional v1 (the classifier-guided DM)
LEARN_SIGMA=${LEARN_SIGMA:-False}                     # True: the classifier-guided DM
NUM_CHANNELS=${NUM_CHANNELS:-128}
NUM_RES_BLOCKS=${NUM_RES_BLOCKS:-2}
CHANNEL_MULT=${CHANNEL_MULT:-}                        # empty: the default for IMAGE_SIZE (128: 1,1,2,3,4)
ATTENTION_RESOLUTIONS=${ATTENTION_RESOLUTIONS:-32,16,8}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-1000}
NOISE_SCHEDULE=${NOISE_SCHEDULE:-linear}
# the noisy-image classifier of classifier-guided sampling (classifier_model_flags)
CLASSIFIER_WIDTH=${CLASSIFIER_WIDTH:-128}
CLASSIFIER_DEPTH=${CLASSIFIER_DEPTH:-2}
CLASSIFIER_ATTENTION_RESOLUTIONS=${CLASSIFIER_ATTENTION_RESOLUTIONS:-32,16,8}

# model_flags: fills the array MODEL_FLAGS (unless the calling config set its own, e.g. for another kind of model).
model_flags() {
    if declare -p MODEL_FLAGS >/dev/null 2>&1; then return; fi
    local use_hae=True
    if [ "$UNET_VER" = v2 ] || [ "$UNET_VER" = v1 ]; then use_hae=False; fi
    MODEL_FLAGS=(
        --unet_ver "$UNET_VER" --use_hae "$use_hae" --image_size "$IMAGE_SIZE" --in_channels "$IN_CHANNELS"
        --num_classes "$NUM_CLASSES" --class_cond "$CLASS_COND" --clf_free "$CLF_FREE" --num_channels "$NUM_CHANNELS"
        --num_res_blocks "$NUM_RES_BLOCKS" --channel_mult "$CHANNEL_MULT" --attention_resolutions "$ATTENTION_RESOLUTIONS"
        --learn_sigma "$LEARN_SIGMA" --diffusion_steps "$DIFFUSION_STEPS" --noise_schedule "$NOISE_SCHEDULE"
        --rescale_learned_sigmas False --rescale_timesteps False
    )
}

# classifier_model_flags: fills MODEL_FLAGS with the classifier's flags (upstream's production classifier: attention
# pool, resblock up/down, scale-shift norm; NUM_CLASSES outputs).
classifier_model_flags() {
    MODEL_FLAGS=(
        --unet_ver v1 --image_size "$IMAGE_SIZE" --in_channels "$IN_CHANNELS" --out_channels "$NUM_CLASSES"
        --classifier_attention_resolutions "$CLASSIFIER_ATTENTION_RESOLUTIONS" --classifier_depth "$CLASSIFIER_DEPTH"
        --classifier_width "$CLASSIFIER_WIDTH" --classifier_pool attention --classifier_resblock_updown True
        --classifier_use_scale_shift_norm True
    )
}
