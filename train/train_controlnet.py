"""Plain ControlNet fine-tuning (diffusion loss only): stage one of segmentation in ControlNet++.

For ADE20K and COCO-Stuff the paper first fine-tunes lllyasviel/control_v11p_sd15_seg on the
training set for 5k steps with the usual diffusion loss, then reward-fine-tunes that model
(arXiv 2404.07987, Sec. 4.1); train/finetune_{ade20k,cocostuff}.sh run this stage. It is
train/reward_control.py without a reward model: the same flags (minus the reward ones), data
code, training step, loop and outputs, imported from there.

    accelerate launch train/train_controlnet.py \
        --pretrained_model_name_or_path work_dirs/toy/toy-sd15 \
        --controlnet_model_name_or_path work_dirs/toy/toy-controlnet \
        --dataset_name work_dirs/toy/datasets/Captioned_ADE20K --caption_column prompt \
        --conditioning_image_column control_seg --resolution 64 --train_batch_size 2 \
        --max_train_steps 3 --output_dir work_dirs/ade20k-finetune-toy

Tasks whose condition is computed from the image (canny, hed, lineart) pass
``--condition_detector <task>`` (and ``--condition_detector_path`` for its weights) instead of
``--conditioning_image_column``: the condition is then extracted on the device exactly as in
reward fine-tuning and evaluation. The toy experiment trains its baselines this way.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

from reward_models import CONDITION_DETECTORS, build_reward_model
from train import reward_control

# The original train_controlnet.py's names for flags that reward_control.py has under other names.
ORIGINAL_FLAG_NAMES = (("proportion_empty_prompts", "text_condition_dropout"),
                       ("min_train_timesteps", "timestep_sampling_start"),
                       ("max_train_timesteps", "timestep_sampling_end"))


def parse_args(input_args=None) -> argparse.Namespace:
    """reward_control.py's flags without the reward ones, plus the condition detector; validated."""
    parser = reward_control.build_parser(__doc__.split("\n")[0], reward=False)
    a = parser.add_argument
    a("--condition_detector", default=None, choices=CONDITION_DETECTORS,
      help="compute the condition from the image with this task's detector (as reward fine-tuning and "
           "evaluation do) instead of reading --conditioning_image_column.")
    a("--condition_detector_path", default=None,
      help="weights of --condition_detector (default: the paper's, see reward_models.DEFAULT_REWARD_MODEL_PATHS).")
    a("--proportion_empty_prompts", type=float, default=None, help="the original's name of --text_condition_dropout.")
    a("--min_train_timesteps", type=int, default=None, help="the original's name of --timestep_sampling_start.")
    a("--max_train_timesteps", type=int, default=None, help="the original's name of --timestep_sampling_end.")
    args = parser.parse_args(input_args)
    for original, ours in ORIGINAL_FLAG_NAMES:
        if getattr(args, original) is not None:
            setattr(args, ours, getattr(args, original))
    if args.conditioning_image_column is None and args.condition_detector is None:
        raise ValueError("plain fine-tuning needs a condition: pass --conditioning_image_column (e.g. control_seg) "
                         "or --condition_detector canny|hed|lineart to compute it from the image.")
    if args.conditioning_image_column is not None and args.condition_detector is not None:
        raise ValueError("pass --conditioning_image_column or --condition_detector, not both.")
    if args.condition_detector_path is not None and args.condition_detector is None:
        raise ValueError("--condition_detector_path needs --condition_detector.")
    if args.label_column is not None:
        raise ValueError("--label_column is used by reward fine-tuning only; drop it here.")
    if args.diffusion_loss_weight == 0:
        raise ValueError("--diffusion_loss_weight 0 leaves nothing to train without a reward; raise it.")
    return reward_control.validate_args(args)


def main(args) -> None:
    """reward_control.py's parts with no reward model: only --condition_detector's, which computes the
    ControlNet condition from the image (the training step then adds no reward loss)."""
    accelerator = reward_control.make_accelerator(args)
    parts = reward_control.load_stable_diffusion(args, accelerator.device, reward_control.weight_dtype_of(accelerator))
    detector = None
    if args.condition_detector is not None:  # canny / hed / lineart: the condition comes from the image
        detector = build_reward_model(args.condition_detector, args.condition_detector_path,
                                      device=accelerator.device, dtype=parts.weight_dtype)
    rows = reward_control.build_train_rows(args, parts.tokenizer, detector)
    reward_control.train(args, accelerator, parts, rows, detector)


if __name__ == "__main__":
    main(parse_args())
