#!/usr/bin/env bash
# ControlNet++ reward fine-tuning, task segmentation (paper Table 8: grad_scale 0.5, 5000 steps, warmup: the original's flag 200, i.e. 100 optimizer steps, see _launch.sh).
#   train/reward_ade20k.sh                               # the paper's run (8 GPUs)
#   NUM_PROCESSES=1 TRAIN_BATCH_SIZE=2 train/reward_ade20k.sh --max_train_steps 10   # flags after it override
# Environment: SD_PATH CONTROLNET_PATH REWARD_MODEL_PATH REWARD_MODEL_CHECKPOINT DATASET OUTPUT_DIR
# NUM_PROCESSES MIXED_PRECISION RESOLUTION TRAIN_BATCH_SIZE GRAD_ACCUM MAX_TRAIN_STEPS
# CHECKPOINTING_STEPS VALIDATION_STEPS ACCELERATE_CONFIG (see train/README.md).
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
paper_args 5000 100
reward_model_args "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py"
run_accelerate train/reward_control.py \
    --task_name segmentation \
    --controlnet_model_name_or_path "${CONTROLNET_PATH:-work_dirs/finetune/ade20k}" \
    "${REWARD_ARGS[@]}" \
    --dataset_name "${DATASET:-limingcv/Captioned_ADE20K}" \
    --image_column image \
    --caption_column prompt \
    --conditioning_image_column control_seg \
    --label_column control_seg \
    --grad_scale 0.5 \
    "${REWARD_WINDOW_ARGS[@]}" \
    "${PAPER_ARGS[@]}" \
    --tracker_project_name reward_ade20k \
    --output_dir "${OUTPUT_DIR:-work_dirs/reward_model/ade20k}" \
    "$@"
