#!/usr/bin/env bash
# ControlNet++ reward fine-tuning, task depth (paper Table 8: grad_scale 1.0, 10000 steps, warmup: the original's flag 10, i.e. 5 optimizer steps, see _launch.sh).
#   train/reward_depth.sh                               # the paper's run (8 GPUs)
#   NUM_PROCESSES=1 TRAIN_BATCH_SIZE=2 train/reward_depth.sh --max_train_steps 10   # flags after it override
# Environment: SD_PATH CONTROLNET_PATH REWARD_MODEL_PATH REWARD_MODEL_CHECKPOINT DATASET OUTPUT_DIR
# NUM_PROCESSES MIXED_PRECISION RESOLUTION TRAIN_BATCH_SIZE GRAD_ACCUM MAX_TRAIN_STEPS
# CHECKPOINTING_STEPS VALIDATION_STEPS ACCELERATE_CONFIG (see train/README.md).
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
paper_args 10000 5
reward_model_args "Intel/dpt-hybrid-midas"
run_accelerate train/reward_control.py \
    --task_name depth \
    --controlnet_model_name_or_path "${CONTROLNET_PATH:-lllyasviel/control_v11f1p_sd15_depth}" \
    "${REWARD_ARGS[@]}" \
    --dataset_name "${DATASET:-limingcv/MultiGen-20M_depth}" \
    --image_column image \
    --caption_column text \
    --conditioning_image_column control_depth \
    --grad_scale 1.0 \
    "${REWARD_WINDOW_ARGS[@]}" \
    "${PAPER_ARGS[@]}" \
    --tracker_project_name reward_depth \
    --output_dir "${OUTPUT_DIR:-work_dirs/reward_model/depth}" \
    "$@"
