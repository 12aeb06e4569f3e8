#!/usr/bin/env bash
# ADE20K segmentation: mIoU of Mask2Former Swin-L on the generated images (paper: 32.55 -> 43.64),
# then FID and CLIP-score. Settings and overrides: eval/common.sh. Extra flags go to eval.py.
#   MODEL_PATH=checkpoints/ade20k/controlnet bash eval/eval_ade20k.sh
TASK_NAME=segmentation
BENCHMARK=ade20k
DEFAULT_DATASET=limingcv/Captioned_ADE20K
DEFAULT_MODEL_PATH=lllyasviel/control_v11p_sd15_seg
METRIC_SCRIPT=eval_seg.py
TASK_ARGS=(--prompt_column prompt --condition_column control_seg --label_column seg_map)
source "$(dirname "$0")/common.sh"
