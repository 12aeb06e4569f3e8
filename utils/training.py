"""What train/reward_control.py and train/train_controlnet.py share: flags, models, the step, the loop.

Both stages train only the ControlNet on top of a frozen Stable Diffusion 1.5:

    train/train_controlnet.py   diffusion loss only (stage one of segmentation)
    train/reward_control.py     diffusion loss + grad_scale * reward loss (ControlNet++)

``training_step`` is the paper's step (arXiv 2404.07987, Sec. 3.3 and docs/REFERENCE "Training
step") with the reward term optional; ``train`` is the accelerate loop around it (accumulation,
EMA, checkpoints, validation, logs). The flags keep the names and meanings of the original
release, which keeps those of diffusers' ``examples/controlnet/train_controlnet.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from utils.data import (RESIZE_INTERPOLATIONS, RESIZE_MODES, ControlNetRows, collate_rows, load_dataset_any,
                        require_columns, to_rgb)
from utils.diffusion import diffusion_target, masked_mean_reward, reward_window_mask, single_step_x0
from reward_models import CONDITION_DETECTORS, REWARD_MODELS, reward_class
from reward_models.base import per_sample_mean
from utils.ema import ModelEMA
from utils.io import atomic_write, hstack_images, save_image, save_json, vstack_images

logger = logging.getLogger("controlnet_pp.train")

CONFIG_FILE = "training_config.json"  # all resolved args, in the output dir and every checkpoint
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON line of logged values per optimizer step, in the output dir
CONTROLNET_SUBFOLDER = "controlnet"  # inside checkpoint-<N>/: training weights, diffusers format
EMA_SUBFOLDER = "controlnet_ema"  # inside checkpoint-<N>/ and output_dir/: EMA weights, diffusers format


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def build_parser(description: str, reward: bool) -> argparse.ArgumentParser:
    """The flags of both stages; ``reward`` adds the reward-model and reward-window flags."""
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    # Models
    a("--pretrained_model_name_or_path", required=True, help="SD1.5 folder or hub id (diffusers layout).")
    a("--controlnet_model_name_or_path", default=None,
      help="ControlNet to start from (folder or hub id); default: initialised from the UNet.")
    a("--revision", default=None, help="revision of the pretrained model on the hub.")
    a("--variant", default=None, help="variant of the model files, e.g. fp16.")
    a("--tokenizer_name", default=None, help="tokenizer folder/id if not the SD folder's tokenizer/.")
    a("--cache_dir", default=None, help="where downloaded models and datasets are cached.")
    # Data
    a("--dataset_name", default=None, help="dataset hub id or a folder written by save_to_disk.")
    a("--dataset_config_name", default=None, help="configuration of a hub dataset (passed to datasets.load_dataset).")
    a("--train_data_dir", default=None, help="alias of --dataset_name for a local folder (diffusers).")
    a("--dataset_split", default="train", help="split of the dataset to train on.")
    a("--image_column", default="image", help="column of the target image.")
    a("--conditioning_image_column", default=None,
      help="column of the ControlNet condition (depth: control_depth, segmentation: control_seg). The original's "
           "values canny / hed / lineart are not columns: they mean 'computed from the image by that detector'.")
    a("--caption_column", default="text", help="column of the caption (a string or a list of strings).")
    a("--label_column", default=None,
      help="column of the segmentation label image (segmentation only); default for ADE20K palette reward models: "
           "the condition column (the original's reward_ade20k.sh passes none).")
    a("--max_train_samples", type=int, default=None, help="train on the first N rows only.")
    a("--keep_in_memory", nargs="?", const=True, default=False, type=_boolean,
      help="load the whole dataset into RAM (also `--keep_in_memory True`, as the original's command lines pass it).")
    a("--resolution", type=int, default=512, help="training resolution; must be divisible by 8.")
    a("--resize_mode", default=None, choices=RESIZE_MODES,
      help="how images become resolution x resolution. Default: the original's: squash (reward stage, "
           "reward_control.py) or center_crop (stage one, train_controlnet.py); random_crop keeps the aspect ratio "
           "and crops at random (utils/data.py: ControlNetRows).")
    a("--resize_interpolation", default=None, choices=RESIZE_INTERPOLATIONS,
      help="image / condition resampling. Default: the original's: bicubic (reward stage) or bilinear (stage one).")
    a("--wrong_ids_file", default=None,
      help="JSON file with a list of row indices to leave out (the original read a pickle here; pickles are refused).")
    a("--image_condition_dropout", type=float, default=0.0, help="probability of a black condition.")
    a("--text_condition_dropout", type=float, default=0.0, help="probability of an empty caption.")
    a("--all_condition_dropout", type=float, default=0.0, help="probability of dropping both.")
    a("--dataloader_num_workers", type=int, default=0, help="0 loads in the main process.")
    # Optimisation
    a("--seed", type=int, default=None, help="seed of everything random; default 0 (runs are reproducible).")
    a("--train_batch_size", type=int, default=4, help="batch size per process.")
    a("--num_train_epochs", type=int, default=1, help="ignored when --max_train_steps is given.")
    a("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="recompute activations to save memory (--no-gradient_checkpointing undoes a launcher's default).")
    a("--learning_rate", type=float, default=5e-6)
    a("--scale_lr", action="store_true", help="multiply the lr by accumulation x batch x processes.")
    a("--lr_scheduler", default="constant",
      help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.")
    a("--lr_warmup_steps", type=int, default=500,
      help="optimizer steps of warmup. The original multiplied its value by the accumulation steps while accelerate "
           "stepped the scheduler once per process: its flag F warmed up F x accumulation / processes optimizer "
           "steps (200 -> 100 on 8 GPUs x 4); the launchers pass those effective values (docs/FIDELITY.md).")
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-08)
    a("--max_grad_norm", type=float, default=1.0)
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    a("--set_grads_to_none", action="store_true", help="zero_grad(set_to_none=True).")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="xformers attention (torch's SDPA, the default, is as fast and needs nothing).")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="default: accelerate config; frozen models run in it, the ControlNet stays fp32.")
    a("--use_ema", action=argparse.BooleanOptionalAction, default=False,
      help="keep an EMA of the ControlNet (saved in controlnet_ema/); --no-use_ema undoes a launcher's default.")
    a("--ema_decay", type=float, default=0.9999, help="EMA decay (ramped as (1+n)/(10+n) at the start).")
    a("--diffusion_loss_weight", type=float, default=1.0,
      help="weight of the diffusion loss; 0 trains on the reward alone.")
    a("--timestep_sampling_start", type=int, default=0, help="t ~ U[start, end).")
    a("--timestep_sampling_end", type=int, default=1000)
    a("--max_nonfinite_steps", type=int, default=10,
      help="stop after this many optimizer steps in a row whose loss is not finite.")
    # Checkpoints, validation, logs
    a("--output_dir", default="controlnet-model")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help="a checkpoint-<N> path, or 'latest' in --output_dir.")
    a("--validation_steps", type=int, default=100)
    a("--validation_prompt", nargs="+", default=None, help="prompts; pair with --validation_image.")
    a("--validation_image", nargs="+", default=None,
      help="condition images; default: conditions and captions of the first training rows.")
    a("--num_validation_images", type=int, default=4, help="images generated per validation input.")
    a("--num_validation_rows", type=int, default=4,
      help="without --validation_image: how many of the first training rows to validate on.")
    a("--num_validation_inference_steps", type=int, default=20, help="UniPC steps at validation.")
    a("--tracker_project_name", default="train_controlnet")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    a("--logging_dir", default="logs", help="tensorboard folder, inside --output_dir.")
    a("--push_to_hub", action="store_true", help=argparse.SUPPRESS)
    # The original release's flags that change nothing here, accepted so its command lines run unchanged.
    a("--hub_token", default=None, help="accepted for the original's command lines (only used by --push_to_hub).")
    a("--hub_model_id", default=None, help="accepted for the original's command lines (only used by --push_to_hub).")
    a("--non_ema_revision", default=None, help="accepted for the original's command lines; unused there too.")
    a("--max_val_samples", type=int, default=None,
      help="the original's name for --num_validation_rows (rows validated on; the original drew them at random "
           "from a validation split, here the first training rows are used).")
    # Validation pipeline settings (the original defined these flags without using them: its validation ran
    # the pipeline's defaults, which is what None keeps here).
    a("--guidance_scale", type=float, default=None, help="CFG scale of the validation images (default: pipeline's 7.5).")
    a("--controlnet_conditioning_scale", type=float, default=None, help="validation: ControlNet residual scale (default 1).")
    a("--control_guidance_start", type=float, default=None, help="validation: fraction of steps where control starts (default 0).")
    a("--control_guidance_end", type=float, default=None, help="validation: fraction of steps where control ends (default 1).")
    if not reward:
        a("--condition_detector", default=None, choices=CONDITION_DETECTORS,
          help="compute the condition from the image with this task's detector (as reward fine-tuning and "
               "evaluation do) instead of reading --conditioning_image_column.")
        a("--condition_detector_path", default=None,
          help="weights of --condition_detector (default: the paper's, see reward_models.DEFAULT_REWARD_MODEL_PATHS).")
        # The original train_controlnet.py's names for flags that exist here under the reward stage's names.
        a("--proportion_empty_prompts", type=float, default=None, help="the original's name of --text_condition_dropout.")
        a("--min_train_timesteps", type=int, default=None, help="the original's name of --timestep_sampling_start.")
        a("--max_train_timesteps", type=int, default=None, help="the original's name of --timestep_sampling_end.")
    if reward:
        a("--task_name", required=True, choices=tuple(REWARD_MODELS), help="which reward model (paper Table 1).")
        a("--reward_model_name_or_path", default=None,
          help="reward model weights (default: the paper's, see reward_models.DEFAULT_REWARD_MODEL_PATHS).")
        a("--reward_model_checkpoint", default=None,
          help="segmentation: checkpoint for a config-based reward model ('random' = random weights, for tests).")
        a("--label_format", default=None, choices=["ade20k_palette", "index", "index_reduce_zero"],
          help="segmentation: how label images encode classes; default inferred from the reward config.")
        a("--palette_labels", default="map_then_resize", choices=["map_then_resize", "resize_then_map"],
          help="ADE20K palette labels: map each colour to its class at full size, then resize nearest (default; "
               "a deliberate fix), or resize the palette image like the condition (bicubic) and map after, as the "
               "original did (blended border colours can become a third class).")
        a("--grad_scale", type=float, default=1.0, help="weight of the reward loss (paper Table 8).")
        a("--min_timestep_rewarding", type=int, default=0, help="reward samples with t >= this.")
        a("--max_timestep_rewarding", type=int, default=200, help="reward samples with t <= this.")
        a("--reward_warmup_steps", type=int, default=0,
          help="ramp the reward weight linearly from 0 to --grad_scale over this many optimizer steps (0: off).")
        # Ctrl-U (ICLR 2025): uncertainty-aware reward, see uncertainty_weighted_loss.
        a("--uncertainty_weighting", action="store_true",
          help="Ctrl-U: weight the reward per pixel by exp(-U), U = the reward model's disagreement between the "
               "images predicted from t and t + --uncertainty_timestep_offset (same noise), and add mean(U). "
               "Ctrl-U also widens the window: --max_timestep_rewarding 400.")
        a("--uncertainty_timestep_offset", type=int, default=1, help="Ctrl-U: the second timestep is t + this.")
        a("--uncertainty_scale", type=float, default=1.0, help="Ctrl-U: U = this x the per-pixel disagreement.")
    return p


def _boolean(value: str) -> bool:
    """``True``/``False``/``1``/``0``/``yes``/``no`` (the original's ``type=bool`` took "False" as True)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _resolve_original_flags(args: argparse.Namespace, reward: bool) -> None:
    """Give the original release's spellings their meaning here (its command lines run unchanged).

    - ``--conditioning_image_column canny|hed|lineart`` was the original reward stage's sentinel for
      "compute the condition from the image with that detector": it is computed on the fly here too
      (the value must be the task). The original's stage one read the value as a column name, and so
      does ``train_controlnet.py`` (``--condition_detector`` computes a condition there).
    - stage one's ``--proportion_empty_prompts`` / ``--min_train_timesteps`` / ``--max_train_timesteps``
      are ``--text_condition_dropout`` / ``--timestep_sampling_start`` / ``--timestep_sampling_end``.
    - ``--max_val_samples`` is ``--num_validation_rows``.
    - the data geometry defaults to the original's per stage (squash + bicubic in the reward stage,
      shorter side + centre crop + bilinear in stage one).
    """
    column = args.conditioning_image_column
    if reward and column in CONDITION_DETECTORS:
        if column != args.task_name:
            raise ValueError(f"--conditioning_image_column {column} computes the {column} condition from the "
                             f"image, but --task_name is {args.task_name}; pass --conditioning_image_column "
                             f"{args.task_name} (or leave it out).")
        args.conditioning_image_column = None
    if not reward:
        for original, ours in (("proportion_empty_prompts", "text_condition_dropout"),
                               ("min_train_timesteps", "timestep_sampling_start"),
                               ("max_train_timesteps", "timestep_sampling_end")):
            if getattr(args, original) is not None:
                setattr(args, ours, getattr(args, original))
    if args.max_val_samples is not None:
        args.num_validation_rows = args.max_val_samples
    if args.resize_mode is None:
        args.resize_mode = "squash" if reward else "center_crop"
    if args.resize_interpolation is None:
        args.resize_interpolation = "bicubic" if reward else "bilinear"


def resolve_label_column(args: argparse.Namespace, reward_model) -> None:
    """Segmentation without ``--label_column`` (the original's reward_ade20k.sh): the labels come from
    the ADE20K palette condition, mapped to classes at full size (REFERENCE.md "Data": the original
    mapped the bicubic-resized condition, blending border colours; see docs/FIDELITY.md)."""
    if args.label_column is not None or not reward_class(args.task_name).needs_label_column:
        return
    if getattr(reward_model, "label_format", None) != "ade20k_palette":
        raise ValueError(f"the reward model's labels are {getattr(reward_model, 'label_format', None)!r}, not ADE20K "
                         "palette images: pass --label_column (panoptic_seg_map for COCO-Stuff).")
    args.label_column = args.conditioning_image_column


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Reject flag combinations up front, with a sentence that says what to change."""
    reward = hasattr(args, "task_name")
    _resolve_original_flags(args, reward)
    if args.dataset_name is None:
        args.dataset_name = args.train_data_dir
    if args.dataset_name is None:
        raise ValueError("Pass --dataset_name (a hub id or a folder written by save_to_disk).")
    if args.seed is None:
        args.seed = 0
    if args.resolution % 8 != 0:
        raise ValueError(f"--resolution {args.resolution} is not divisible by 8 (the VAE's factor); "
                         f"use e.g. {args.resolution // 8 * 8 or 8}.")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "num_validation_images", "num_validation_rows", "num_validation_inference_steps",
                 "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    for flag in ("image_condition_dropout", "text_condition_dropout", "all_condition_dropout"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ValueError(f"--{flag} must be a probability in [0, 1], got {getattr(args, flag)}.")
    total = args.image_condition_dropout + args.text_condition_dropout + args.all_condition_dropout
    if total > 1.0:
        raise ValueError(f"the three condition dropouts add up to {total} > 1; lower them.")
    if not 0 <= args.timestep_sampling_start < args.timestep_sampling_end:
        raise ValueError(f"--timestep_sampling_start {args.timestep_sampling_start} must be >= 0 and below "
                         f"--timestep_sampling_end {args.timestep_sampling_end} (t ~ U[start, end)).")
    if args.diffusion_loss_weight < 0:
        raise ValueError(f"--diffusion_loss_weight must be >= 0, got {args.diffusion_loss_weight}.")
    if (args.validation_prompt is None) != (args.validation_image is None):
        raise ValueError("Pass --validation_prompt and --validation_image together (or neither: the first "
                         "training rows are then used).")
    if args.validation_image is not None:
        n_prompt, n_image = len(args.validation_prompt), len(args.validation_image)
        if n_prompt != n_image and 1 not in (n_prompt, n_image):
            raise ValueError(f"{n_prompt} --validation_prompt and {n_image} --validation_image: pass one of "
                             "either, or as many of each.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                         "(CUDA only) or drop --use_8bit_adam.")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError("--enable_xformers_memory_efficient_attention needs xformers, which is not installed; "
                         "drop the flag (torch's scaled-dot-product attention is used by default).")
    if args.push_to_hub:
        raise ValueError("--push_to_hub is not supported; upload --output_dir with `huggingface-cli upload`.")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        candidate = Path(args.output_dir) / args.resume_from_checkpoint
        if not candidate.is_dir():
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder (nor inside "
                             f"--output_dir); pass a checkpoint-<N> folder or 'latest'.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"--report_to {args.report_to!r}: choose tensorboard, wandb, all or none.")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report_to wandb needs wandb: `pip install wandb`, or use --report_to tensorboard.")

    if reward:
        if not args.timestep_sampling_start <= args.min_timestep_rewarding <= args.max_timestep_rewarding \
                < args.timestep_sampling_end:
            raise ValueError(
                f"the reward window [--min_timestep_rewarding {args.min_timestep_rewarding}, "
                f"--max_timestep_rewarding {args.max_timestep_rewarding}] must be ordered and inside the sampling "
                f"range [--timestep_sampling_start {args.timestep_sampling_start}, --timestep_sampling_end "
                f"{args.timestep_sampling_end}); otherwise no sample is ever rewarded. The paper uses 0..200."
            )
        reward_model = reward_class(args.task_name)
        if reward_model.needs_condition_column and args.conditioning_image_column is None:
            raise ValueError(f"--task_name {args.task_name} reads its condition from the dataset: pass "
                             "--conditioning_image_column (control_depth for depth, control_seg for segmentation).")
        if not reward_model.needs_condition_column and args.conditioning_image_column is not None:
            raise ValueError(f"--task_name {args.task_name} computes its condition from the image with the reward "
                             "model (as at evaluation); drop --conditioning_image_column.")
        if reward_model.needs_label_column and args.label_column is None and args.label_format not in (
                None, "ade20k_palette"):
            raise ValueError(f"--task_name {args.task_name} with --label_format {args.label_format} compares against "
                             "class-index maps: pass --label_column (panoptic_seg_map for COCO-Stuff).")
        if not reward_model.needs_label_column:
            for flag in ("label_column", "label_format", "reward_model_checkpoint"):
                if getattr(args, flag) is not None:
                    raise ValueError(f"--task_name {args.task_name} has no labels nor config-based reward model; "
                                     f"drop --{flag}.")
        if args.grad_scale < 0:
            raise ValueError(f"--grad_scale must be >= 0, got {args.grad_scale}.")
        if args.reward_warmup_steps < 0:
            raise ValueError(f"--reward_warmup_steps must be >= 0, got {args.reward_warmup_steps}.")
        if args.uncertainty_timestep_offset < 1:
            raise ValueError(f"--uncertainty_timestep_offset must be >= 1, got {args.uncertainty_timestep_offset}.")
        if args.uncertainty_scale <= 0:
            raise ValueError(f"--uncertainty_scale must be > 0, got {args.uncertainty_scale}.")
        if args.uncertainty_weighting and args.grad_scale == 0:
            raise ValueError("--uncertainty_weighting weights the reward loss, which --grad_scale 0 switches off; "
                             "raise --grad_scale or drop --uncertainty_weighting.")
        if args.diffusion_loss_weight == 0 and args.grad_scale == 0:
            raise ValueError("--diffusion_loss_weight 0 and --grad_scale 0 leave nothing to train; raise one.")
    else:
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
    validate_numbers(args)
    validate_paths(args)
    return args


def validate_paths(args: argparse.Namespace) -> None:
    """Local-looking model and data paths exist (never looked up on the hub), a ControlNet folder has
    weights, and --output_dir can be written: all before minutes of model loading."""
    from utils.flags import check_local_path, check_writable_dir

    check_local_path("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    check_local_path("--tokenizer_name", args.tokenizer_name)
    check_local_path("--dataset_name", args.dataset_name)
    for flag in ("reward_model_name_or_path", "condition_detector_path"):
        check_local_path(f"--{flag}", getattr(args, flag, None), kind="any")
    for image in args.validation_image or ():
        check_local_path("--validation_image", image, kind="file")
    controlnet = args.controlnet_model_name_or_path
    check_local_path("--controlnet_model_name_or_path", controlnet)
    if controlnet is not None and Path(controlnet).expanduser().is_dir():
        folder = Path(controlnet).expanduser()
        weights = [p.name for p in folder.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin", ".json")]
        if not (folder / "config.json").is_file() or not weights:
            raise ValueError(f"--controlnet_model_name_or_path {controlnet} is not a diffusers ControlNet folder: it "
                             f"needs config.json and diffusion_pytorch_model.safetensors; it has "
                             f"{sorted(p.name for p in folder.iterdir())[:10]}.")
    check_writable_dir("--output_dir", args.output_dir)


def validate_numbers(args: argparse.Namespace) -> None:
    """Every number flag finite and in its range, before any model loads (issue 16: NaN passed every
    check above; a negative --learning_rate failed only after loading, without naming the flag)."""
    from utils.flags import check_resolution, reject_nonfinite, require

    reject_nonfinite(args)
    check_resolution(args)
    require(args, "learning_rate", low=0, low_inclusive=False)
    require(args, "dataloader_num_workers", low=0, high=os.cpu_count() * 4 if os.cpu_count() else None)
    require(args, "max_train_samples", low=1)
    require(args, "num_train_epochs", low=1)
    require(args, "checkpoints_total_limit", low=1, why="0 would delete every checkpoint, the new one too")
    require(args, "lr_warmup_steps", low=0)
    require(args, "lr_num_cycles", low=1)
    for flag in ("adam_beta1", "adam_beta2"):
        require(args, flag, low=0, high=1, why="an exponential decay rate in [0, 1)")
        if getattr(args, flag) == 1:
            raise ValueError(f"--{flag} must be below 1 (1 never forgets the first gradient), got 1.0.")
    require(args, "adam_weight_decay", low=0)
    require(args, "adam_epsilon", low=0, low_inclusive=False, why="it keeps Adam's division finite")
    require(args, "max_grad_norm", low=0, why="0 turns clipping off")
    require(args, "ema_decay", low=0, high=1)
    if args.ema_decay == 1:
        raise ValueError("--ema_decay must be below 1 (1 keeps the initial weights forever), got 1.0.")
    require(args, "seed", low=0, high=2**63 - 1)
    if hasattr(args, "guidance_scale"):  # the original release's flags, used by validation only
        require(args, "guidance_scale", low=0)
        require(args, "controlnet_conditioning_scale", low=0)
        for flag in ("control_guidance_start", "control_guidance_end"):
            require(args, flag, low=0, high=1, why="a fraction of the sampling steps")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


@dataclass
class StableDiffusionParts:
    tokenizer: Any
    noise_scheduler: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    weight_dtype: torch.dtype


def make_accelerator(args):
    """Accelerator with a seedable sampler: the shuffle order depends on (seed, epoch) only, so a
    resumed run sees the same batches as an uninterrupted one."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_stable_diffusion(args, device, weight_dtype: torch.dtype) -> StableDiffusionParts:
    """Frozen SD1.5 parts in ``weight_dtype`` (the mixed-precision dtype) on ``device``, and the
    trainable ControlNet in fp32."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or path, subfolder=None if args.tokenizer_name
                                              else "tokenizer", **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    if args.controlnet_model_name_or_path:
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, cache_dir=args.cache_dir)
    else:
        logger.info("Initialising the ControlNet from the UNet (no --controlnet_model_name_or_path).")
        controlnet = ControlNetModel.from_unet(unet)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if args.timestep_sampling_end > num_train_timesteps:
        raise ValueError(f"--timestep_sampling_end {args.timestep_sampling_end} exceeds the scheduler's "
                         f"{num_train_timesteps} training timesteps; lower it.")

    for frozen in (vae, unet, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device, dtype=weight_dtype)
    controlnet.train()
    controlnet.to(device)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        # The reward's gradient flows back through the VAE decoder and the frozen UNet into the
        # ControlNet, so their activations are checkpointed too, not only the ControlNet's.
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if controlnet.dtype != torch.float32:
        raise ValueError(f"the trainable ControlNet is {controlnet.dtype}, it must be float32 (mixed precision "
                         "keeps fp32 master weights); load it without a half-precision variant.")
    return StableDiffusionParts(tokenizer, noise_scheduler, text_encoder, vae, unet, controlnet, weight_dtype)


def load_train_dataset(args):
    """The training split with the configured columns checked (error lists the available ones)."""
    dataset = load_dataset_any(args.dataset_name, args.dataset_split, cache_dir=args.cache_dir,
                               config_name=args.dataset_config_name)
    if args.wrong_ids_file is not None:
        dataset = dataset.select(rows_to_keep(args.wrong_ids_file, len(dataset)))
    require_columns(dataset, {"--image_column": args.image_column, "--caption_column": args.caption_column,
                              "--conditioning_image_column": args.conditioning_image_column,
                              "--label_column": args.label_column},
                    f"{args.dataset_name} (split {args.dataset_split})")
    if args.max_train_samples is not None:
        # The first rows, not a shuffled subset: row indices in error messages stay the dataset's own.
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if args.keep_in_memory:
        dataset = dataset.flatten_indices(keep_in_memory=True)
    if len(dataset) == 0:
        raise ValueError(f"dataset {args.dataset_name} (split {args.dataset_split}) has no rows.")
    return dataset


def rows_to_keep(wrong_ids_file: str, num_rows: int) -> list[int]:
    """Row indices not listed in ``--wrong_ids_file`` (a JSON list of integers)."""
    path = Path(wrong_ids_file)
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise ValueError(f"--wrong_ids_file {path}: pickles can run code when read and are not loaded. Convert it "
                         "once: python -c \"import json,pickle,sys; json.dump(sorted(pickle.load(open(sys.argv[1],'rb')))"
                         ", open(sys.argv[2],'w'))\" OLD.pkl NEW.json, and pass the .json file.")
    try:
        wrong = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--wrong_ids_file {path}: cannot read a JSON list of row indices ({error}).") from error
    if not isinstance(wrong, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in wrong):
        raise ValueError(f"--wrong_ids_file {path} must hold a JSON list of integer row indices.")
    excluded = set(wrong)
    return [i for i in range(num_rows) if i not in excluded]


def build_train_rows(args, tokenizer, reward_model=None, train: bool = True) -> ControlNetRows:
    return ControlNetRows(
        load_train_dataset(args), tokenizer, args.resolution, args.image_column, args.caption_column,
        conditioning_image_column=args.conditioning_image_column, label_column=args.label_column,
        label_from_image=reward_model.label_from_image if args.label_column else None, train=train, seed=args.seed,
        image_condition_dropout=args.image_condition_dropout, text_condition_dropout=args.text_condition_dropout,
        all_condition_dropout=args.all_condition_dropout, dataset_name=f"{args.dataset_name} ({args.dataset_split})",
        resize_mode=args.resize_mode, resize_interpolation=args.resize_interpolation,
        label_from_resized=palette_label_mapping(args, reward_model),
    )


def palette_label_mapping(args, reward_model):
    """--palette_labels resize_then_map: the original's ADE20K labels (the resized palette, mapped after)."""
    if getattr(args, "palette_labels", "map_then_resize") == "map_then_resize" or args.label_column is None:
        return None
    if getattr(reward_model, "label_format", None) != "ade20k_palette":
        raise ValueError("--palette_labels resize_then_map is for ADE20K palette labels; this reward model reads "
                         f"{getattr(reward_model, 'label_format', None)!r} labels. Drop the flag.")
    from reward_models.palettes import ade20k_resized_palette_to_label

    return ade20k_resized_palette_to_label


def build_optimizer(args, params):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.") \
                from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# --------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    loss: torch.Tensor  # what is back-propagated
    diffusion_loss: torch.Tensor
    reward_loss: torch.Tensor  # 0 when no sample is in the window (or no reward model)
    rewarded_fraction: float  # share of the batch inside the reward window
    uncertainty: float | None = None  # Ctrl-U: mean U over the rewarded pixels (None when off)


def step_generator(seed: int, process_index: int, global_step: int, micro_step: int, device) -> torch.Generator:
    """The noise / timestep generator of one micro-batch, a pure function of where it is in training.

    Keyed by (seed, rank, optimizer step, micro-batch within the accumulation): a resumed run
    draws exactly what the uninterrupted run drew, and ranks draw different noise (DiT's
    per-rank seeds from one global seed).
    """
    import numpy as np

    seed_value = int(np.random.SeedSequence([seed, process_index, global_step, micro_step]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed_value)


def subset(batch: dict, index: torch.Tensor) -> dict:
    """The rows ``index`` of every tensor of a collated batch."""
    return {key: value[index.to(value.device)] if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] as the original computed it (x * std + mean with std = mean = 0.5), so the
    canny / hed / lineart conditions and targets see the values the original's detectors saw."""
    return pixel_values.float() * 0.5 + 0.5


def controlnet_condition(batch: dict, reward_model) -> torch.Tensor:
    """The ControlNet input in [0, 1]: the dataset's conditioning column, or computed on the device.

    canny / hed / lineart have no condition column: like the original, the condition is extracted
    from the target image, here batched on the device by the reward model's own detector.
    """
    if "conditioning_pixel_values" in batch:
        condition = batch["conditioning_pixel_values"]
    else:
        with torch.no_grad():
            condition = reward_model.extract_condition(denormalize(batch["pixel_values"]))
    if "drop_condition" in batch:  # image / all condition dropout: a black condition image
        keep = (~batch["drop_condition"]).to(device=condition.device, dtype=condition.dtype)
        condition = condition * keep[:, None, None, None]
    return condition


@dataclass
class NoisePrediction:
    latents: torch.Tensor  # clean latents x0 (scaled)
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B,) int64
    noisy_latents: torch.Tensor  # x_t
    model_pred: torch.Tensor  # UNet + ControlNet output (epsilon or v)
    diffusion_loss: torch.Tensor  # MSE against the noise / velocity, float32 scalar
    encoder_hidden_states: torch.Tensor | None = None  # text embeddings (Ctrl-U predicts again at t + k)
    condition: torch.Tensor | None = None  # ControlNet input, in the frozen models' dtype


def controlled_unet(parts: StableDiffusionParts, controlnet: torch.nn.Module, noisy_latents: torch.Tensor,
                    timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, condition: torch.Tensor
                    ) -> torch.Tensor:
    """The frozen UNet's prediction with the trainable ControlNet's residuals added."""
    down_residuals, mid_residual = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                              controlnet_cond=condition, return_dict=False)
    dtype = parts.weight_dtype
    return parts.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                      down_block_additional_residuals=[r.to(dtype) for r in down_residuals],
                      mid_block_additional_residual=mid_residual.to(dtype), return_dict=False)[0]


def predict_noise(batch: dict, parts: StableDiffusionParts, controlnet: torch.nn.Module, args,
                  generator: torch.Generator, reward_model=None, timesteps: torch.Tensor | None = None
                  ) -> NoisePrediction:
    """Noise the batch to t ~ U[start, end), predict with UNet + ControlNet, diffusion loss.

    ``reward_model`` is only used to compute the condition of canny / hed / lineart.
    ``timesteps`` (B,) replaces the sampled ones (tests and benchmarks that need a given mask).
    """
    vae, noise_scheduler, dtype = parts.vae, parts.noise_scheduler, parts.weight_dtype
    device = batch["pixel_values"].device
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample(generator)
        latents = latents * vae.config.scaling_factor
        encoder_hidden_states = parts.text_encoder(batch["input_ids"], return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    sampled = torch.randint(args.timestep_sampling_start, args.timestep_sampling_end, (latents.shape[0],),
                            generator=generator, device=device).long()
    timesteps = sampled if timesteps is None else timesteps.to(device=device, dtype=torch.long)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    condition = controlnet_condition(batch, reward_model).to(dtype)
    model_pred = controlled_unet(parts, controlnet, noisy_latents, timesteps, encoder_hidden_states, condition)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    diffusion_loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return NoisePrediction(latents, noise, timesteps, noisy_latents, model_pred, diffusion_loss,
                           encoder_hidden_states, condition)


def decode_x0(parts: StableDiffusionParts, noisy_latents: torch.Tensor, model_pred: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """The single-step clean-image estimate, decoded by the VAE, in [0, 1] (differentiable)."""
    vae = parts.vae
    x0 = single_step_x0(parts.noise_scheduler, noisy_latents, model_pred, timesteps)
    images = vae.decode(x0.to(parts.weight_dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def windowed_reward_loss(batch: dict, parts: StableDiffusionParts, prediction: NoisePrediction, args,
                         reward_model, controlnet: torch.nn.Module | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """The reward loss sum_i(mask_i * r_i) / (sum_i mask_i + 1e-10), the mask (B,) and Ctrl-U's mean U.

    Only the samples inside the window are decoded and scored (defect 6: the original decoded
    the whole batch and masked ~80% of it away afterwards); the value is the same. When no
    sample is inside, neither the VAE nor the reward model runs and the loss is 0.
    With --uncertainty_weighting, r_i is Ctrl-U's uncertainty-weighted loss (needs ``controlnet``).
    """
    mask = reward_window_mask(prediction.timesteps, args.min_timestep_rewarding, args.max_timestep_rewarding)
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return torch.zeros((), device=mask.device), mask, None
    timesteps = prediction.timesteps[index]
    images = decode_x0(parts, prediction.noisy_latents[index], prediction.model_pred[index], timesteps)
    rewarded = subset(batch, index)
    output, target = reward_model(images), reward_model.target(rewarded)
    if not getattr(args, "uncertainty_weighting", False):
        return masked_mean_reward(reward_model.loss(output, target), mask), mask, None
    if controlnet is None:
        raise ValueError("--uncertainty_weighting predicts a second time: pass the controlnet.")
    # Ctrl-U: the same clean latent and the same noise, noised to t + k, predicted again.
    later = (timesteps + args.uncertainty_timestep_offset).clamp(max=parts.noise_scheduler.config.num_train_timesteps - 1)
    noisy_later = parts.noise_scheduler.add_noise(prediction.latents[index], prediction.noise[index], later)
    pred_later = controlled_unet(parts, controlnet, noisy_later, later, prediction.encoder_hidden_states[index],
                                 prediction.condition[index])
    output_later = reward_model(decode_x0(parts, noisy_later, pred_later, later))
    per_sample, uncertainty = uncertainty_weighted_loss(reward_model, output, output_later, target,
                                                        args.uncertainty_scale)
    return masked_mean_reward(per_sample, mask), mask, uncertainty


def uncertainty_weighted_loss(reward_model, output: torch.Tensor, output_later: torch.Tensor, target: torch.Tensor,
                              scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """Ctrl-U's per-sample reward: mean over valid pixels of exp(-U) * loss + U, and mean U.

    U = scale * ``reward_model.disagreement`` of the reward outputs for the images predicted from
    t and from t + k (KL of the class distributions for segmentation, absolute difference of the
    dense maps otherwise). Pixels where the reward model's reading is unstable (U large) are
    trusted less; the + U term keeps U from growing to silence the reward, and, since U is not
    detached, also asks the two predictions to agree.
    """
    loss_map, valid = reward_model.pixel_loss(output, target)
    uncertainty = scale * reward_model.disagreement(output, output_later)
    if uncertainty.shape != loss_map.shape:
        raise ValueError(f"{type(reward_model).__name__}.disagreement gave {tuple(uncertainty.shape)}, "
                         f"pixel_loss {tuple(loss_map.shape)}: they must be on the same grid.")
    per_sample = per_sample_mean(torch.exp(-uncertainty) * loss_map + uncertainty, valid)
    return per_sample, per_sample_mean(uncertainty.detach(), valid).mean().item()


def reward_weight(args, global_step: int) -> float:
    """--grad_scale, ramped linearly over the first --reward_warmup_steps optimizer steps."""
    warmup = getattr(args, "reward_warmup_steps", 0)
    if warmup <= 0:
        return args.grad_scale
    return args.grad_scale * min(1.0, (global_step + 1) / warmup)


def training_step(batch: dict, parts: StableDiffusionParts, controlnet: torch.nn.Module, args,
                  generator: torch.Generator, reward_model=None, timesteps: torch.Tensor | None = None,
                  global_step: int | None = None) -> StepOutput:
    """loss = diffusion_loss_weight * diffusion_loss + grad_scale * reward_loss (paper Eq. 7).

    ``controlnet`` is the (possibly DDP-wrapped) trainable model; ``parts`` holds the frozen ones.
    Plain ControlNet fine-tuning when ``args`` has no reward flags (train_controlnet.py); there
    ``reward_model``, if given, only computes the condition (--condition_detector). ``global_step``
    (the optimizer step) ramps the reward weight with --reward_warmup_steps; None means fully ramped.
    With a reward weight of 0 the reward loss is still computed, without gradient, for the logs.
    """
    prediction = predict_noise(batch, parts, controlnet, args, generator, reward_model, timesteps)
    loss = args.diffusion_loss_weight * prediction.diffusion_loss
    reward_loss, rewarded_fraction, uncertainty = torch.zeros((), device=loss.device), 0.0, None
    if reward_model is not None and hasattr(args, "grad_scale"):
        weight = args.grad_scale if global_step is None else reward_weight(args, global_step)
        with contextlib.nullcontext() if weight > 0 else torch.no_grad():
            reward_loss, mask, uncertainty = windowed_reward_loss(batch, parts, prediction, args, reward_model,
                                                                  controlnet)
        rewarded_fraction = mask.float().mean().item()
        if weight > 0:
            loss = loss + weight * reward_loss
    return StepOutput(loss, prediction.diffusion_loss.detach(), reward_loss.detach(), rewarded_fraction, uncertainty)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def config_dict(args) -> dict:
    return {key: value for key, value in sorted(vars(args).items())}


# A checkpoint is written into ``.checkpoint-<N>.incomplete/`` and renamed to ``checkpoint-<N>/``
# only once every file of every process is in it: a folder under the final name is complete
# whatever moment a kill or a full disk struck (a half-written checkpoint used to be taken as
# ``latest`` and crash the resume). The leading dot keeps it out of ``checkpoint-*`` globs.
INCOMPLETE_SUFFIX = ".incomplete"


def incomplete_checkpoint_path(output_dir: str | Path, global_step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{global_step}{INCOMPLETE_SUFFIX}"


def checkpoint_step(path: str | Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<N> folders of ``output_dir``, oldest first (complete by construction, see above)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def list_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders whose write was interrupted (kill, full disk); never resumed from."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = r"\.checkpoint-\d+" + re.escape(INCOMPLETE_SUFFIX)
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(pattern, p.name))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Remove what a killed run left half-written: incomplete checkpoints and atomic_write temporaries
    (``.<name>.<random>.tmp``, e.g. of a validation grid). Call it only while holding the run lock:
    then no live process is writing them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for replaced in output_dir.glob(".checkpoint-*.replaced"):  # killed while replacing a checkpoint
        original = output_dir / replaced.name[1:].removesuffix(".replaced")
        if original.exists():
            shutil.rmtree(replaced)
        else:
            os.rename(replaced, original)  # the complete old one is better than none
    for folder in list_incomplete_checkpoints(output_dir):
        logger.info(f"Removing {folder}: a checkpoint write that did not finish (killed, or the disk was full).")
        shutil.rmtree(folder)
    for temporary in output_dir.rglob(".*.tmp"):
        if temporary.is_file():
            temporary.unlink()


def register_checkpoint_hooks(accelerator, args, ema: ModelEMA | None) -> None:
    """Save the ControlNet (and EMA) in diffusers format inside every checkpoint, like diffusers'
    train_controlnet.py, plus the resolved config; load them back on resume."""
    from diffusers import ControlNetModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(os.path.join(output_dir, CONTROLNET_SUBFOLDER))
                if ema is not None:
                    ema.save_pretrained(unwrapped, os.path.join(output_dir, EMA_SUBFOLDER))
            save_json(config_dict(args), os.path.join(output_dir, CONFIG_FILE))
        while weights:  # saved above in diffusers format; accelerate must not save them again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            saved = ControlNetModel.from_pretrained(input_dir, subfolder=CONTROLNET_SUBFOLDER)
            model.register_to_config(**saved.config)
            model.load_state_dict(saved.state_dict())
            del saved
        if ema is not None:
            ema.load_pretrained(os.path.join(input_dir, EMA_SUBFOLDER))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, args, global_step: int) -> Path:
    """checkpoint-<step>/ with model, EMA, optimizer, lr scheduler, sampler, RNG states and config.

    Written into ``.checkpoint-<step>.incomplete/`` by every process, renamed by the main process
    once all have finished; only then are old checkpoints removed for --checkpoints_total_limit
    (removing them first left nothing to resume from when the write was killed).
    """
    output_dir = Path(args.output_dir)
    path, partial = output_dir / f"checkpoint-{global_step}", incomplete_checkpoint_path(output_dir, global_step)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except OSError as error:
        raise OSError(error.errno, f"writing checkpoint-{global_step} into {partial} failed ({error}); the "
                                   f"checkpoints already in {output_dir} are intact and the next run with "
                                   f"--resume_from_checkpoint latest continues from the newest of them "
                                   f"(free some space first if the disk is full).") from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():  # the same step saved by an earlier attempt: replace it, never merge into it
            stale = output_dir / f".checkpoint-{global_step}.replaced"
            if stale.exists():
                shutil.rmtree(stale)
            os.rename(path, stale)
            os.rename(partial, path)
            shutil.rmtree(stale)
        else:
            os.rename(partial, path)
        if args.checkpoints_total_limit is not None:
            existing = list_checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - args.checkpoints_total_limit)]:
                logger.info(f"Removing {old} (--checkpoints_total_limit {args.checkpoints_total_limit}).")
                # Renamed out of the checkpoint-<N> namespace first: a kill during the removal
                # leaves a hidden folder, never a half-deleted checkpoint-<N> taken as latest.
                doomed = output_dir / f".{old.name}{INCOMPLETE_SUFFIX}"
                os.rename(old, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    logger.info(f"Saved {path}")
    return path


# Data settings a run must keep when it resumes, with the value a checkpoint written before the
# setting existed was made with (the data geometry became the original's: issue "Faithful by default").
RESUMED_DATA_SETTINGS = {"resize_mode": "random_crop", "resize_interpolation": "bicubic",
                         "palette_labels": "map_then_resize"}


def check_resumed_data_settings(args, resume_path: Path) -> None:
    """Refuse to continue a checkpoint with other data settings than it was trained with (a run
    started before the defaults became the original's would silently switch its geometry)."""
    config_file = Path(resume_path) / CONFIG_FILE
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text())
    changed = [(name, saved.get(name, old_default), getattr(args, name)) for name, old_default in
               RESUMED_DATA_SETTINGS.items()
               if hasattr(args, name) and saved.get(name, old_default) != getattr(args, name)]
    if changed:
        flags = " ".join(f"--{name} {before}" for name, before, _ in changed)
        details = ", ".join(f"--{name} {before} there, {now} now" for name, before, now in changed)
        raise ValueError(f"{resume_path} was trained with other data settings ({details}). Pass {flags} to continue "
                         "it as it was, or start a new --output_dir.")


def resolve_resume_path(args) -> Path | None:
    """The checkpoint folder to resume from; None when 'latest' finds none (a fresh start)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        for skipped in list_incomplete_checkpoints(args.output_dir):
            logger.warning(f"Skipping {skipped}: its write did not finish (the run was killed or the disk was full).")
        checkpoints = list_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        path = Path(args.output_dir) / args.resume_from_checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist.")
    return path


def truncate_train_log(output_dir: str | Path, global_step: int) -> None:
    """Keep the train_log.jsonl lines of steps <= ``global_step`` (where training resumes): a killed
    run logged steps after its last checkpoint that the resumed run logs again."""
    log = Path(output_dir) / TRAIN_LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= global_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write(log, lambda tmp: Path(tmp).write_text("".join(kept)))


def save_final_model(unwrapped, ema, output_dir: str | Path) -> None:
    """The ControlNet in diffusers format in ``output_dir`` (and the EMA in controlnet_ema/), each
    file written whole into a temporary folder and moved into place, so a kill leaves either the
    previous file or the new one, never a truncated one."""
    output_dir = Path(output_dir)
    staging = output_dir / f".final{INCOMPLETE_SUFFIX}"
    if staging.exists():
        shutil.rmtree(staging)
    unwrapped.save_pretrained(staging)
    if ema is not None:
        ema.save_pretrained(unwrapped, staging / EMA_SUBFOLDER)
    for source in sorted(staging.rglob("*"), key=lambda p: len(p.parts)):
        if source.is_file():
            target = output_dir / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(staging)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validation_inputs(args, rows: ControlNetRows, reward_model, device) -> list[tuple[str, torch.Tensor]]:
    """(prompt, condition (3,R,R) in [0,1]) pairs: the flags' images, or the first training rows.

    ``--validation_image`` files are condition images (as in diffusers). Without them, the first
    rows of the training set give the caption (its first one) and the condition the ControlNet
    was trained with (the dataset column, or extracted from the image by the reward model).
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from utils.images import read_image

    pairs = []
    if args.validation_image is not None:
        prompts, images = args.validation_prompt, args.validation_image
        count = max(len(prompts), len(images))
        for k in range(count):
            prompt, image_path = prompts[k % len(prompts)], images[k % len(images)]
            try:
                image = to_rgb(read_image(image_path))
            except Exception as error:
                raise ValueError(f"--validation_image {image_path}: cannot read it ({error}).") from error
            image = TF.resize(image, args.resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
            image = TF.center_crop(image, args.resolution)
            pairs.append((prompt, TF.to_tensor(image)))
        return pairs
    eval_rows = ControlNetRows(rows.dataset, rows.tokenizer, args.resolution, rows.image_column, rows.caption_column,
                               conditioning_image_column=rows.conditioning_image_column, train=False, seed=args.seed,
                               resize_mode=rows.resize_mode, resize_interpolation=rows.resize_interpolation)
    for index in range(min(args.num_validation_rows, len(eval_rows))):
        row = eval_rows[index]
        batch = {key: value[None].to(device) for key, value in row.items()
                 if key in ("pixel_values", "conditioning_pixel_values")}
        condition = controlnet_condition(batch, reward_model)[0].float().cpu()
        pairs.append((eval_rows.caption(index), condition))
    return pairs


def validation_pipeline_kwargs(args) -> dict:
    """The validation flags the user set (the original's unused --guidance_scale etc.); None keeps the
    pipeline's default, which is what the original's validation ran."""
    names = ("guidance_scale", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _to_pil(image01: torch.Tensor):
    from PIL import Image

    array = (image01.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


@torch.no_grad()
def log_validation(args, accelerator, parts: StableDiffusionParts, controlnet, inputs, step: int, reward_model=None):
    """One grid per input: rows of (condition | generated | condition extracted from the generated
    image by the reward model), one row per generated image; PNG in validation/step-<N>/ and to
    the trackers. ``controlnet`` is the unwrapped model with the weights to show."""
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    pipeline = StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        controlnet=controlnet, scheduler=UniPCMultistepScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    out_dir = Path(args.output_dir) / "validation" / f"step-{step}"
    grids = []
    for k, (prompt, condition) in enumerate(inputs):
        condition_pil = _to_pil(condition)
        rows = []
        for _ in range(args.num_validation_images):
            with accelerator.autocast():
                generated = pipeline(prompt, image=condition_pil, num_inference_steps=args.num_validation_inference_steps,
                                     generator=generator, height=args.resolution, width=args.resolution,
                                     output_type="pil", **validation_pipeline_kwargs(args)).images[0]
            row = [condition_pil, generated]
            if reward_model is not None:
                import torchvision.transforms.functional as TF

                image = TF.to_tensor(generated)[None].to(accelerator.device, dtype=parts.weight_dtype)
                row.append(_to_pil(reward_model.extract_condition(image)[0]))
            rows.append(hstack_images(row))
        grid = vstack_images(rows)
        save_image(grid, out_dir / f"sample-{k}.png")
        grids.append((prompt, grid))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            for k, (prompt, grid) in enumerate(grids):
                tracker.writer.add_image(f"validation/{k}", np.asarray(grid), step, dataformats="HWC")
                tracker.writer.add_text(f"validation/{k}/prompt", prompt, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=prompt) for prompt, grid in grids]}, step=step)
    del pipeline
    return out_dir


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _tracker_config(args) -> dict:
    """Tensorboard's hparams accept only scalars and strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in config_dict(args).items()}


def train(args, accelerator, parts: StableDiffusionParts, rows: ControlNetRows, reward_model=None) -> None:
    """Train ``parts.controlnet`` on ``rows``; save checkpoints, validation grids and the final model.

    Writes to ``--output_dir``: ``training_config.json``; ``checkpoint-<N>/`` (accelerate state
    with ``controlnet/``, ``controlnet_ema/`` and ``training_config.json`` inside);
    ``validation/step-<N>/sample-<k>.png``; at the end the ControlNet in diffusers format in the
    folder itself (``ControlNetModel.from_pretrained(output_dir)``) and, with --use_ema, the EMA
    weights in ``controlnet_ema/``.
    """
    lock = lock_output_dir(accelerator, args)  # before anything is written there
    try:
        _train(args, accelerator, parts, rows, reward_model)
    finally:
        if lock is not None:
            lock.release()


def lock_output_dir(accelerator, args):
    """The main process takes --output_dir's run lock (utils/run_lock.py) and clears what a killed
    run left half-written; every process raises if another run holds it."""
    from accelerate.utils import broadcast_object_list

    from utils.run_lock import RunLock

    lock, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            lock = RunLock(args.output_dir).acquire()
        except (RuntimeError, OSError) as error:
            refusal = [str(error)]
        else:
            if lock.previous:
                logger.warning(f"{args.output_dir}: the previous run (pid {lock.previous.get('pid')}) ended without "
                               "releasing its lock (killed?); continuing from what it saved.")
            remove_stale_temporaries(args.output_dir)
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise RuntimeError(refusal[0])
    return lock


def _train(args, accelerator, parts: StableDiffusionParts, rows: ControlNetRows, reward_model=None) -> None:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    dataloader = torch.utils.data.DataLoader(rows, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=collate_rows, num_workers=args.dataloader_num_workers)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    controlnet = parts.controlnet
    optimizer = build_optimizer(args, controlnet.parameters())
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / accelerator.num_processes)
                                / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    # accelerate steps the lr scheduler once per process, hence the factor (as diffusers does).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, dataloader,
                                                                          lr_scheduler)
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    unwrapped = accelerator.unwrap_model(controlnet)
    ema = ModelEMA(unwrapped, decay=args.ema_decay).to(accelerator.device) if args.use_ema else None
    register_checkpoint_hooks(accelerator, args, ema)
    validation = validation_inputs(args, rows, reward_model, accelerator.device) if accelerator.is_main_process \
        else None
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(args))

    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = resolve_resume_path(args)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        check_resumed_data_settings(args, resume_path)
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir}; starting from step 0.")
    if accelerator.is_main_process:
        truncate_train_log(args.output_dir, global_step)
        # Written once the run is about to train (after --scale_lr and --max_train_steps are
        # resolved): a re-run that fails while loading leaves the finished run's config as it was.
        save_json(config_dict(args), Path(args.output_dir) / CONFIG_FILE)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(rows)} rows, {num_epochs} epochs, {args.max_train_steps} steps of {total_batch} samples "
                f"({args.train_batch_size} per process x {accelerator.num_processes} processes x "
                f"{args.gradient_accumulation_steps} accumulation); starting at step {global_step}.")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    nonfinite_in_a_row, skipped_steps = 0, 0
    sums, micro_step, cycle_nonfinite, cycle_start = _zero_sums(), 0, False, time.perf_counter()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        rows.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch and skip_batches \
            else dataloader
        for batch in batches:
            with accelerator.accumulate(controlnet):
                generator = step_generator(args.seed, accelerator.process_index, global_step, micro_step,
                                           accelerator.device)
                out = training_step(batch, parts, controlnet, args, generator, reward_model, global_step=global_step)
                # All ranks agree on skipping, or DDP's gradient all-reduce would hang.
                finite = accelerator.reduce(torch.isfinite(out.loss.detach()).float(), reduction="sum")
                if finite.item() == accelerator.num_processes:
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
                else:
                    cycle_nonfinite = True
                if not cycle_nonfinite:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none or cycle_nonfinite)
            _accumulate(sums, out)
            micro_step += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            if cycle_nonfinite:
                nonfinite_in_a_row += 1
                skipped_steps += 1
                logger.warning(f"step {global_step}: non-finite loss, optimizer step skipped "
                               f"({nonfinite_in_a_row} in a row, {skipped_steps} in total).")
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (last at step "
                        f"{global_step}); stopping. Lower --learning_rate or --grad_scale, or use bf16/fp32 "
                        f"(--mixed_precision); resume from the last checkpoint in {args.output_dir}."
                    )
            else:
                nonfinite_in_a_row = 0
                if ema is not None:
                    ema.update(unwrapped)
            logs = {key: value / micro_step for key, value in sums.items()}
            logs.update(lr=lr_scheduler.get_last_lr()[0], step_time=time.perf_counter() - cycle_start,
                        skipped_steps=skipped_steps)
            if reward_model is not None and getattr(args, "reward_warmup_steps", 0) > 0:
                logs["reward_weight"] = reward_weight(args, global_step - 1)
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:  # the same numbers as plain JSON lines, for scripts and plots
                with open(Path(args.output_dir) / TRAIN_LOG_FILE, "a") as log_file:
                    log_file.write(json.dumps({"step": global_step, **logs}) + "\n")
            progress.set_postfix(loss=f"{logs['loss']:.4f}", reward=f"{logs['reward_loss']:.4f}")
            sums, micro_step, cycle_nonfinite, cycle_start = _zero_sums(), 0, False, time.perf_counter()

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                _validate(args, accelerator, parts, unwrapped, ema, validation, global_step, reward_model)
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_model(unwrapped, ema, args.output_dir)
        logger.info(f"Saved the final ControlNet to {args.output_dir}"
                    + (f" and its EMA to {Path(args.output_dir) / EMA_SUBFOLDER}" if ema is not None else ""))
    accelerator.end_training()


def _zero_sums() -> dict:
    return {"loss": 0.0, "diffusion_loss": 0.0, "reward_loss": 0.0, "rewarded_fraction": 0.0}


def _accumulate(sums: dict, out: StepOutput) -> None:
    sums["loss"] += out.loss.item()
    sums["diffusion_loss"] += out.diffusion_loss.item()
    sums["reward_loss"] += out.reward_loss.item()
    sums["rewarded_fraction"] += out.rewarded_fraction
    if out.uncertainty is not None:  # Ctrl-U; averaged over all micro-batches like the rest
        sums["uncertainty"] = sums.get("uncertainty", 0.0) + out.uncertainty


@contextlib.contextmanager
def _half_precision_outputs(model):
    """Run ``model`` without the fp32 output conversion accelerate's prepare() adds under mixed precision.

    In the validation pipeline the ControlNet's fp32 residuals meet the half-precision UNet: CUDA
    autocast runs GroupNorm in fp32 and copes, CPU autocast does not (bf16 on a CPU raised "mixed
    dtype"). The original forward, under the pipeline's autocast, returns them in the half dtype.
    """
    original = model.__dict__.get("_original_forward")
    if original is None:  # not prepared with mixed precision
        yield model
        return
    wrapped = model.__dict__["forward"]
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


def _validate(args, accelerator, parts, unwrapped, ema, inputs, step, reward_model) -> None:
    """Validation with the EMA weights when there is an EMA, swapped in and restored (defect 3)."""
    was_training = unwrapped.training
    unwrapped.eval()
    context = ema.swapped_into(unwrapped) if ema is not None else contextlib.nullcontext()
    with context, _half_precision_outputs(unwrapped):
        out_dir = log_validation(args, accelerator, parts, unwrapped, inputs, step, reward_model)
    unwrapped.train(was_training)
    logger.info(f"Validation images in {out_dir}")
