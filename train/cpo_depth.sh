#!/usr/bin/env bash
# CPO fine-tuning, task depth (CPO's train/reward_depth_CPO.sh: grad_scale 0.05, margin 1e-2, lr 1e-8, 4000 steps,
# accumulation 2, EMA), starting from the ControlNet++ model of train/reward_depth.sh.
#   train/cpo_depth.sh                                     # CPO's run (4 GPUs)
#   NUM_PROCESSES=1 TRAIN_BATCH_SIZE=2 train/cpo_depth.sh --max_train_steps 10   # flags after it override
# The dataset carries winner / loser condition columns: CPO's published one, or one built for any
# dataset by train/build_cpo_data.py (see train/README.md "CPO").
# Environment: SD_PATH CONTROLNET_PATH DATASET IMAGE_COLUMN OUTPUT_DIR NUM_PROCESSES MIXED_PRECISION
# RESOLUTION TRAIN_BATCH_SIZE GRAD_ACCUM MAX_TRAIN_STEPS CHECKPOINTING_STEPS VALIDATION_STEPS ACCELERATE_CONFIG.
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
cpo_args 4000 2 1e-8 50
run_accelerate train/reward_control.py \
    --task_name depth \
    --controlnet_model_name_or_path "${CONTROLNET_PATH:-work_dirs/reward_model/depth}" \
    --dataset_name "${DATASET:-ucfzl/MultiGen_Reward_DPO_cond}" \
    --image_column "${IMAGE_COLUMN:-image}" \
    --caption_column prompt \
    --conditioning_image_column winner_depth \
    --grad_scale 0.05 \
    --margin 1e-2 \
    --use_ema \
    "${CPO_ARGS[@]}" \
    --tracker_project_name cpo_depth \
    --output_dir "${OUTPUT_DIR:-work_dirs/cpo/depth}" \
    "$@"
