#!/usr/bin/env bash
# CPO fine-tuning, task lineart (CPO's train/reward_lineart_CPO.sh: grad_scale 0.02, margin 3e-2, lr 3e-9, 10000 steps,
# accumulation 8), starting from the ControlNet++ model of train/reward_linedrawing.sh.
#   train/cpo_lineart.sh                                     # CPO's run (4 GPUs)
#   NUM_PROCESSES=1 TRAIN_BATCH_SIZE=2 train/cpo_lineart.sh --max_train_steps 10   # flags after it override
# The dataset carries winner / loser condition columns: CPO's published one, or one built for any
# dataset by train/build_cpo_data.py (see train/README.md "CPO").
# Environment: SD_PATH CONTROLNET_PATH DATASET IMAGE_COLUMN OUTPUT_DIR NUM_PROCESSES MIXED_PRECISION
# RESOLUTION TRAIN_BATCH_SIZE GRAD_ACCUM MAX_TRAIN_STEPS CHECKPOINTING_STEPS VALIDATION_STEPS ACCELERATE_CONFIG.
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
cpo_args 10000 8 3e-9 200
run_accelerate train/reward_control.py \
    --task_name lineart \
    --controlnet_model_name_or_path "${CONTROLNET_PATH:-work_dirs/reward_model/linedrawing}" \
    --dataset_name "${DATASET:-ucfzl/MultiGen_Reward_DPO_cond}" \
    --image_column "${IMAGE_COLUMN:-image}" \
    --caption_column prompt \
    --conditioning_image_column winner_lineart \
    --grad_scale 0.02 \
    --margin 3e-2 \
    "${CPO_ARGS[@]}" \
    --tracker_project_name cpo_lineart \
    --output_dir "${OUTPUT_DIR:-work_dirs/cpo/lineart}" \
    "$@"
