#!/usr/bin/env bash
# Canny: F1 of the generated images' edges (paper: ControlNet v1.1 34.65, ControlNet++ 37.04),
# then FID and CLIP-score. Settings and overrides: eval/common.sh. Extra flags go to eval.py.
#   MODEL_PATH=checkpoints/canny/controlnet bash eval/eval_canny.sh
TASK_NAME=canny
DEFAULT_DATASET=limingcv/MultiGen-20M_canny_eval
DEFAULT_MODEL_PATH=lllyasviel/control_v11p_sd15_canny
METRIC_SCRIPT=eval_edge.py
TASK_ARGS=(--prompt_column text)
source "$(dirname "$0")/common.sh"
