#!/usr/bin/env bash
# LineArt: MS-SSIM of the generated images' line drawings (paper: 0.7054 -> 0.8399),
# then FID and CLIP-score. Settings and overrides: eval/common.sh. Extra flags go to eval.py.
#   MODEL_PATH=checkpoints/lineart/controlnet bash eval/eval_lineart.sh
TASK_NAME=lineart
DEFAULT_DATASET=limingcv/MultiGen-20M_canny_eval
DEFAULT_MODEL_PATH=lllyasviel/control_v11p_sd15_lineart
METRIC_SCRIPT=eval_edge.py
TASK_ARGS=(--prompt_column text)
source "$(dirname "$0")/common.sh"
