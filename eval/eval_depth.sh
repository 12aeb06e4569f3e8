#!/usr/bin/env bash
# Depth: RMSE between DPT-Large's depth of the generated images and the input depth
# (paper: 35.90 -> 28.32), then FID and CLIP-score. Settings and overrides: eval/common.sh.
#   MODEL_PATH=checkpoints/depth/controlnet bash eval/eval_depth.sh
TASK_NAME=depth
DEFAULT_DATASET=limingcv/MultiGen-20M_depth_eval
DEFAULT_MODEL_PATH=lllyasviel/control_v11f1p_sd15_depth
METRIC_SCRIPT=eval_depth.py
TASK_ARGS=(--prompt_column text --condition_column control_depth --label_column control_depth)
source "$(dirname "$0")/common.sh"
