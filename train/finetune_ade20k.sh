#!/usr/bin/env bash
# Stage one of segmentation (ade20k): plain ControlNet fine-tuning of control_v11p_sd15_seg for
# 5k steps (paper Sec. 4.1; warmup: the original's flag 200, i.e. 100 optimizer steps, see _launch.sh), whose output train/reward_ade20k.sh starts from.
#   train/finetune_ade20k.sh                 # the paper's run (8 GPUs)
# Environment: SD_PATH CONTROLNET_PATH DATASET OUTPUT_DIR NUM_PROCESSES MIXED_PRECISION RESOLUTION
# TRAIN_BATCH_SIZE GRAD_ACCUM MAX_TRAIN_STEPS CHECKPOINTING_STEPS VALIDATION_STEPS ACCELERATE_CONFIG.
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
paper_args 5000 100
run_accelerate train/train_controlnet.py \
    --controlnet_model_name_or_path "${CONTROLNET_PATH:-lllyasviel/control_v11p_sd15_seg}" \
    --dataset_name "${DATASET:-limingcv/Captioned_ADE20K}" \
    --image_column image \
    --caption_column prompt \
    --conditioning_image_column control_seg \
    "${PAPER_ARGS[@]}" \
    --tracker_project_name finetune_ade20k \
    --output_dir "${OUTPUT_DIR:-work_dirs/finetune/ade20k}" \
    "$@"
