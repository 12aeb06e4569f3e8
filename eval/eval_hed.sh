#!/usr/bin/env bash
# HED (soft edge): MS-SSIM of the generated images' HED maps (paper: 0.7621 -> 0.8097),
# then FID and CLIP-score. Settings and overrides: eval/common.sh. Extra flags go to eval.py.
#   MODEL_PATH=checkpoints/hed/controlnet bash eval/eval_hed.sh
TASK_NAME=hed
DEFAULT_DATASET=limingcv/MultiGen-20M_canny_eval
DEFAULT_MODEL_PATH=lllyasviel/control_v11p_sd15_softedge
METRIC_SCRIPT=eval_edge.py
TASK_ARGS=(--prompt_column text)
source "$(dirname "$0")/common.sh"
