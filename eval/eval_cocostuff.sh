#!/usr/bin/env bash
# COCO-Stuff segmentation: mIoU of DeepLabV3-R101 on the generated images (paper: 27.46 -> 34.56),
# then FID and CLIP-score. Settings and overrides: eval/common.sh. Extra flags go to eval.py.
#   MODEL_PATH=checkpoints/cocostuff/controlnet bash eval/eval_cocostuff.sh
TASK_NAME=segmentation
BENCHMARK=cocostuff
DEFAULT_DATASET=limingcv/Captioned_COCOStuff
DEFAULT_MODEL_PATH=lllyasviel/control_v11p_sd15_seg
METRIC_SCRIPT=eval_seg.py
TASK_ARGS=(--prompt_column prompt --condition_column control_seg --label_column panoptic_seg_map)
source "$(dirname "$0")/common.sh"
