"""ControlNet++ reward fine-tuning: diffusion loss + grad_scale * cycle-consistency reward.

Paper: "ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback"
(ECCV 2024, arXiv 2404.07987). A pretrained ControlNet on a frozen SD1.5 is fine-tuned so that a
frozen reward model (edge detector, depth estimator, segmenter) applied to the one-step image
estimate x0(t) gives back the input condition, for samples noised to t <= 200. This file is the
whole method, in the order of the paper's Sec. 3: flags, models (3.1 the diffusion model and the
ControlNet, 3.2 the reward model), data, the training step (3.1 diffusion loss, 3.3 single-step
x0 inside the reward window, 3.2 reward, Eq. 7), the loop and what it saves. Stage one of
segmentation (train/train_controlnet.py) is this script without a reward model.

Launch (from the repository root; the paper's settings are in train/reward_<task>.sh):

    # one GPU (or CPU), e.g. on the toy world of `python -m toy.world --out work_dirs/toy`
    accelerate launch train/reward_control.py --task_name canny \
        --pretrained_model_name_or_path work_dirs/toy/toy-sd15 \
        --controlnet_model_name_or_path work_dirs/toy/toy-controlnet \
        --reward_model_name_or_path canny --dataset_name work_dirs/toy/datasets/MultiGen-20M_train \
        --caption_column text --resolution 64 --train_batch_size 2 --max_train_steps 3 \
        --output_dir work_dirs/canny-toy
    # one node of 8 GPUs (paper): NUM_PROCESSES=8 train/reward_canny.sh
    # several nodes: accelerate launch --config_file train/configs/multi_node.yaml \
    #     --machine_rank $RANK --main_process_ip $MASTER train/reward_control.py ...

The step (``training_step``), per batch:
    t ~ U[timestep_sampling_start, timestep_sampling_end); x_t = noised latent of the image
    eps_hat = UNet(x_t, t, text, ControlNet(x_t, t, text, condition))
    diffusion_loss = MSE(eps_hat, eps)
    mask = min_timestep_rewarding <= t <= max_timestep_rewarding
    for the masked samples only: x0 = single-step estimate, image = VAE.decode(x0) in [0, 1],
        r_i = reward_model.loss(reward_model(image), reward_model.target(batch))
    reward_loss = sum(r_i) / (mask.sum() + 1e-10)
    loss = diffusion_loss_weight * diffusion_loss + grad_scale * reward_loss
With --objective cpo (CPO, NeurIPS 2025; docs/CPO.md) the reward is replaced by a preference
between the row's winner and loser conditions (``cpo_terms``), with no reward model:
    loss = grad_scale * diffusion_loss + cpo_loss

Outputs in --output_dir (utils/checkpoints.py): the final ControlNet in the folder itself (EMA
in controlnet_ema/), checkpoint-<N>/, validation/step-<N>/, training_config.json,
train_log.jsonl, logs/ (tensorboard).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from reward_models import CONDITION_DETECTORS, REWARD_MODELS, build_reward_model, reward_class
from train.validation import validate, validation_inputs
from utils.checkpoints import (CONFIG_FILE, EMA_SUBFOLDER, append_train_log, check_resumed_data_settings,
                               checkpoint_step, config_dict, lock_output_dir, register_checkpoint_hooks,
                               resolve_resume_path, save_checkpoint, save_final_model, truncate_train_log)
from utils.data import (RESIZE_INTERPOLATIONS, RESIZE_MODES, ControlNetRows, collate_rows, load_dataset_any,
                        require_columns, rows_to_keep)
from utils.diffusion import diffusion_target, masked_mean_reward, reward_window_mask, single_step_x0
from utils.ema import ModelEMA
from utils.flags import (boolean, check_local_path, check_resolution, check_writable_dir, reject_nonfinite,
                         require)
from utils.io import save_json

logger = logging.getLogger("controlnet_pp.train")


# --------------------------------------------------------------------------------------------
# 1. Flags (the original release's names; parse_args validates their combinations up front)
# --------------------------------------------------------------------------------------------


def build_parser(description: str, reward: bool) -> argparse.ArgumentParser:
    """The flags of both stages (train_controlnet.py adds stage one's own); ``reward`` adds the reward
    model, reward window and Ctrl-U flags."""
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
    a("--keep_in_memory", nargs="?", const=True, default=False, type=boolean,
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
        # Ctrl-U (ICLR 2025): uncertainty-aware reward, see RewardModel.uncertainty_weighted_loss.
        a("--uncertainty_weighting", action="store_true",
          help="Ctrl-U: weight the reward per pixel by exp(-U), U = the reward model's disagreement between the "
               "images predicted from t and t + --uncertainty_timestep_offset (same noise), and add mean(U). "
               "Ctrl-U also widens the window: --max_timestep_rewarding 400.")
        a("--uncertainty_timestep_offset", type=int, default=1, help="Ctrl-U: the second timestep is t + this.")
        a("--uncertainty_scale", type=float, default=1.0, help="Ctrl-U: U = this x the per-pixel disagreement.")
        # CPO (NeurIPS 2025): a preference between two conditions instead of the reward; CPO's own flag
        # names and defaults, so that its command lines carry over (docs/CPO.md).
        a("--objective", default="reward", choices=("reward", "cpo"),
          help="reward: ControlNet++ (Ctrl-U with --uncertainty_weighting); cpo: CPO's condition preference "
               "loss between --conditioning_image_column (winner) and the loser column, no reward model.")
        a("--loser_conditioning_image_column", default=None,
          help="CPO: column of the losing condition; default: the winner column with 'winner' replaced by "
               "'loser' (CPO's rule: winner_canny -> loser_canny).")
        a("--beta_dpo", type=float, default=None, help=f"CPO: beta of the preference weight (default "
          f"{CPO_DEFAULTS['beta_dpo']:g}, CPO's; its launchers pass 5000).")
        a("--margin", type=float, default=None, help=f"CPO: margin of the hinge (default {CPO_DEFAULTS['margin']:g}, CPO's).")
        a("--start_step", type=int, default=None,
          help="CPO: accepted for CPO's command lines; there it only changed which total was logged before that "
               "step, never the gradient (every term is logged here).")
    return p


def _resolve_original_flags(args: argparse.Namespace, reward: bool) -> None:
    """Give the original release's spellings their meaning here (its command lines run unchanged).

    - ``--conditioning_image_column canny|hed|lineart`` was the original reward stage's sentinel for
      "compute the condition from the image with that detector": it is computed on the fly here too
      (the value must be the task). The original's stage one read the value as a column name, and so
      does ``train_controlnet.py`` (``--condition_detector`` computes a condition there).
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
    if args.max_val_samples is not None:
        args.num_validation_rows = args.max_val_samples
    if args.resize_mode is None:
        args.resize_mode = "squash" if reward else "center_crop"
    if args.resize_interpolation is None:
        args.resize_interpolation = "bicubic" if reward else "bilinear"


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
    for flag in ("image_condition_dropout", "text_condition_dropout", "all_condition_dropout"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ValueError(f"--{flag} must be a probability in [0, 1], got {getattr(args, flag)}.")
    total = args.image_condition_dropout + args.text_condition_dropout + args.all_condition_dropout
    if total > 1.0:
        raise ValueError(f"the three condition dropouts add up to {total} > 1; lower them.")
    if not 0 <= args.timestep_sampling_start < args.timestep_sampling_end:
        raise ValueError(f"--timestep_sampling_start {args.timestep_sampling_start} must be >= 0 and below "
                         f"--timestep_sampling_end {args.timestep_sampling_end} (t ~ U[start, end)).")
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

    if reward and args.objective == "cpo":
        validate_cpo(args)
    elif reward:
        for flag in CPO_DEFAULTS | {"loser_conditioning_image_column": None, "start_step": None}:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} is a flag of CPO's objective; add --objective cpo or drop it.")
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
        if args.uncertainty_weighting and args.grad_scale == 0:
            raise ValueError("--uncertainty_weighting weights the reward loss, which --grad_scale 0 switches off; "
                             "raise --grad_scale or drop --uncertainty_weighting.")
        if args.diffusion_loss_weight == 0 and args.grad_scale == 0:
            raise ValueError("--diffusion_loss_weight 0 and --grad_scale 0 leave nothing to train; raise one.")
    validate_numbers(args)
    validate_paths(args)
    return args


def validate_cpo(args: argparse.Namespace) -> None:
    """--objective cpo: a winner and a loser condition column, CPO's defaults; nothing of the reward."""
    if args.conditioning_image_column is None:
        raise ValueError("--objective cpo contrasts two condition columns of the dataset: pass "
                         "--conditioning_image_column with the winning one (winner_<task> in CPO's datasets, or as "
                         "written by train/build_cpo_data.py).")
    if args.loser_conditioning_image_column is None:
        loser = args.conditioning_image_column.replace("winner", "loser")
        if loser == args.conditioning_image_column:
            raise ValueError(f"--conditioning_image_column {loser} has no 'winner' in its name to find the loser "
                             "column by CPO's rule: pass --loser_conditioning_image_column.")
        args.loser_conditioning_image_column = loser
    if args.uncertainty_weighting or args.reward_warmup_steps:
        raise ValueError("--uncertainty_weighting and --reward_warmup_steps shape the reward, which --objective cpo "
                         "does not use; drop them.")
    if args.diffusion_loss_weight != 1.0:
        raise ValueError("--objective cpo weights the diffusion loss with --grad_scale (CPO's meaning of the flag); "
                         "drop --diffusion_loss_weight.")
    for flag in ("label_column", "label_format", "reward_model_checkpoint"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--objective cpo loads no reward model and reads no labels; drop --{flag}.")
    for flag, default in CPO_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)


def validate_paths(args: argparse.Namespace) -> None:
    """Local-looking model and data paths exist (never looked up on the hub), a ControlNet folder has
    weights, and --output_dir can be written: all before minutes of model loading."""
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
    reject_nonfinite(args)
    check_resolution(args)
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "num_validation_images", "num_validation_rows", "num_validation_inference_steps",
                 "max_nonfinite_steps", "max_train_steps", "max_train_samples", "num_train_epochs", "lr_num_cycles"):
        require(args, flag, low=1)
    for flag in ("diffusion_loss_weight", "lr_warmup_steps", "adam_weight_decay"):
        require(args, flag, low=0)
    require(args, "learning_rate", low=0, low_inclusive=False)
    require(args, "dataloader_num_workers", low=0, high=os.cpu_count() * 4 if os.cpu_count() else None)
    require(args, "checkpoints_total_limit", low=1, why="0 would delete every checkpoint, the new one too")
    for flag in ("adam_beta1", "adam_beta2"):
        require(args, flag, low=0, high=1, why="an exponential decay rate in [0, 1)")
        if getattr(args, flag) == 1:
            raise ValueError(f"--{flag} must be below 1 (1 never forgets the first gradient), got 1.0.")
    require(args, "adam_epsilon", low=0, low_inclusive=False, why="it keeps Adam's division finite")
    require(args, "max_grad_norm", low=0, why="0 turns clipping off")
    require(args, "ema_decay", low=0, high=1)
    if args.ema_decay == 1:
        raise ValueError("--ema_decay must be below 1 (1 keeps the initial weights forever), got 1.0.")
    require(args, "seed", low=0, high=2**63 - 1)
    # The original release's flags, used by validation only.
    require(args, "guidance_scale", low=0)
    require(args, "controlnet_conditioning_scale", low=0)
    for flag in ("control_guidance_start", "control_guidance_end"):
        require(args, flag, low=0, high=1, why="a fraction of the sampling steps")
    if hasattr(args, "task_name"):  # the reward stage's flags
        require(args, "grad_scale", low=0)
        require(args, "reward_warmup_steps", low=0)
        require(args, "uncertainty_timestep_offset", low=1)
        require(args, "uncertainty_scale", low=0, low_inclusive=False)
        require(args, "beta_dpo", low=0, low_inclusive=False, why="it scales CPO's preference weight")
        require(args, "margin", low=0)


def parse_args(input_args=None) -> argparse.Namespace:
    """The reward stage's flags, validated (``input_args`` for tests; None reads sys.argv)."""
    parser = build_parser(__doc__.split("\n")[0], reward=True)
    return validate_args(parser.parse_args(input_args))


# --------------------------------------------------------------------------------------------
# 2. Models: the frozen SD1.5 and the trainable ControlNet (Sec. 3.1), the reward model (Sec. 3.2)
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


def load_reward_model(args, device, weight_dtype: torch.dtype):
    """The frozen reward model of --task_name, in the mixed-precision dtype like the other frozen
    models (its losses are fp32)."""
    return build_reward_model(args.task_name, args.reward_model_name_or_path, checkpoint=args.reward_model_checkpoint,
                              label_format=args.label_format, device=device, dtype=weight_dtype)


# --------------------------------------------------------------------------------------------
# 3. Data: rows of (image, caption, condition[, label]) at the training resolution (utils/data.py)
# --------------------------------------------------------------------------------------------


def load_train_dataset(args):
    """The training split with the configured columns checked (error lists the available ones)."""
    dataset = load_dataset_any(args.dataset_name, args.dataset_split, cache_dir=args.cache_dir,
                               config_name=args.dataset_config_name)
    if args.wrong_ids_file is not None:
        dataset = dataset.select(rows_to_keep(args.wrong_ids_file, len(dataset)))
    require_columns(dataset, {"--image_column": args.image_column, "--caption_column": args.caption_column,
                              "--conditioning_image_column": args.conditioning_image_column,
                              "--label_column": args.label_column,
                              "--loser_conditioning_image_column": getattr(args, "loser_conditioning_image_column",
                                                                           None)},
                    f"{args.dataset_name} (split {args.dataset_split})")
    if args.max_train_samples is not None:
        # The first rows, not a shuffled subset: row indices in error messages stay the dataset's own.
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if args.keep_in_memory:
        dataset = dataset.flatten_indices(keep_in_memory=True)
    if len(dataset) == 0:
        raise ValueError(f"dataset {args.dataset_name} (split {args.dataset_split}) has no rows.")
    return dataset


def build_train_rows(args, tokenizer, reward_model=None, train: bool = True) -> ControlNetRows:
    return ControlNetRows(
        load_train_dataset(args), tokenizer, args.resolution, args.image_column, args.caption_column,
        conditioning_image_column=args.conditioning_image_column, label_column=args.label_column,
        label_from_image=reward_model.label_from_image if args.label_column else None, train=train, seed=args.seed,
        image_condition_dropout=args.image_condition_dropout, text_condition_dropout=args.text_condition_dropout,
        all_condition_dropout=args.all_condition_dropout, dataset_name=f"{args.dataset_name} ({args.dataset_split})",
        resize_mode=args.resize_mode, resize_interpolation=args.resize_interpolation,
        label_from_resized=palette_label_mapping(args, reward_model),
        loser_conditioning_image_column=getattr(args, "loser_conditioning_image_column", None),
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


# --------------------------------------------------------------------------------------------
# 4. The training step: diffusion loss (Sec. 3.1), single-step x0 inside the reward window (Sec. 3.3),
#    the reward (Sec. 3.2), their weighted sum (Eq. 7)
# --------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    loss: torch.Tensor  # what is back-propagated
    diffusion_loss: torch.Tensor
    reward_loss: torch.Tensor  # 0 when no sample is in the window (or no reward model)
    rewarded_fraction: float  # share of the batch inside the reward window
    uncertainty: float | None = None  # Ctrl-U: mean U over the rewarded pixels (None when off)
    logs: dict[str, float] = field(default_factory=dict)  # further per-step values (CPO's terms)


def step_generator(seed: int, process_index: int, global_step: int, micro_step: int, device) -> torch.Generator:
    """The noise / timestep generator of one micro-batch, a pure function of where it is in training.

    Keyed by (seed, rank, optimizer step, micro-batch within the accumulation): a resumed run
    draws exactly what the uninterrupted run drew, and ranks draw different noise (DiT's
    per-rank seeds from one global seed).
    """
    import numpy as np

    seed_value = int(np.random.SeedSequence([seed, process_index, global_step, micro_step]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed_value)


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
    x0 = single_step_x0(parts.noise_scheduler, noisy_latents, model_pred, timesteps)
    return decode_images(parts, x0.to(parts.weight_dtype) / parts.vae.config.scaling_factor)


def decode_images(parts: StableDiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled VAE latents (already divided by the scaling factor) decoded to images in [0, 1]."""
    images = parts.vae.decode(latents.to(parts.weight_dtype), return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def subset(batch: dict, index: torch.Tensor) -> dict:
    """The rows ``index`` of every tensor of a collated batch."""
    return {key: value[index.to(value.device)] if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


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
    per_sample, uncertainty = reward_model.uncertainty_weighted_loss(output, output_later, target,
                                                                     args.uncertainty_scale)
    return masked_mean_reward(per_sample, mask), mask, uncertainty


def reward_weight(args, global_step: int) -> float:
    """--grad_scale, ramped linearly over the first --reward_warmup_steps optimizer steps."""
    warmup = getattr(args, "reward_warmup_steps", 0)
    if warmup <= 0:
        return args.grad_scale
    return args.grad_scale * min(1.0, (global_step + 1) / warmup)


def training_step(batch: dict, parts: StableDiffusionParts, controlnet: torch.nn.Module, args,
                  generator: torch.Generator, reward_model=None, timesteps: torch.Tensor | None = None,
                  global_step: int | None = None, reference: torch.nn.Module | None = None) -> StepOutput:
    """loss = diffusion_loss_weight * diffusion_loss + grad_scale * reward_loss (paper Eq. 7); with a
    CPO ``reference`` (--objective cpo): loss = grad_scale * diffusion_loss + cpo_loss.

    ``controlnet`` is the (possibly DDP-wrapped) trainable model; ``parts`` holds the frozen ones.
    Plain ControlNet fine-tuning when ``args`` has no reward flags (train_controlnet.py); there
    ``reward_model``, if given, only computes the condition (--condition_detector). ``global_step``
    (the optimizer step) ramps the reward weight with --reward_warmup_steps; None means fully ramped.
    With a reward weight of 0 the reward loss is still computed, without gradient, for the logs.
    """
    prediction = predict_noise(batch, parts, controlnet, args, generator, reward_model, timesteps)
    if reference is not None:
        preference, logs = cpo_terms(batch, parts, controlnet, reference, args, generator, prediction)
        return StepOutput(args.grad_scale * prediction.diffusion_loss + preference, prediction.diffusion_loss.detach(),
                          torch.zeros((), device=preference.device), 0.0, logs=logs)
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
# 4b. CPO (Lyu et al., NeurIPS 2025, arXiv 2511.04753): the winner condition c_w of a row against a
#     loser c_l (a condition extracted from a ControlNet's generation), judged by the diffusion loss
#     of the trained ControlNet relative to its frozen starting copy. No reward model, every t.
# --------------------------------------------------------------------------------------------

CPO_DEFAULTS = {"beta_dpo": 2500.0, "margin": 2e-3}  # CPO's script's defaults (its launchers: 5000, per-task)
CPO_FORWARD_WEIGHT, CPO_REVERSE_WEIGHT = 0.9, 0.1  # CPO's fixed weights of its two hinge terms


def frozen_reference(controlnet: torch.nn.Module, device_type: str, weight_dtype: torch.dtype) -> torch.nn.Module:
    """CPO's reference: a frozen copy of the starting ControlNet (the UNet stays shared). It keeps fp32
    weights and runs under the autocast that accelerate gives the trained copy, so that both compute
    the same numbers before the first update (D = D_ref exactly)."""
    reference = copy.deepcopy(controlnet).requires_grad_(False).eval()
    if weight_dtype != torch.float32:
        reference.forward = torch.autocast(device_type=device_type, dtype=weight_dtype)(reference.forward)
    return reference


def preference_weight(margin_now: torch.Tensor, reference_margin: torch.Tensor, beta: float) -> torch.Tensor:
    """CPO's s = sigmoid(beta / 2 * (D - D_ref)), without gradient."""
    return torch.sigmoid(0.5 * beta * (margin_now.detach() - reference_margin))


def cpo_loss(winner_loss: torch.Tensor, loser_loss: torch.Tensor, reference_winner_loss: torch.Tensor,
             reference_loser_loss: torch.Tensor, beta: float, margin: float, mask: torch.Tensor) -> torch.Tensor:
    """CPO's loss from per-sample diffusion MSEs (B,), averaged over ``mask`` (B,) bool (CPO: t > 0):

        D = L_w - L_l,  D_ref = R_w - R_l,  s = sigmoid(beta / 2 * (D - D_ref))   (no gradient)
        0.9 * s * relu(D + margin) + 0.1 * (1 - s) * relu(margin - D)

    s is large while the trained model prefers the winner less than the reference does; the hinge
    then pushes L_w below L_l - margin, and the small reverse term stops the margin running away.
    0 (still in the graph) when the mask is empty, as in CPO's script.
    """
    margin_now = winner_loss - loser_loss
    weight = preference_weight(margin_now, reference_winner_loss - reference_loser_loss, beta)
    per_sample = (CPO_FORWARD_WEIGHT * weight * F.relu(margin_now + margin)
                  + CPO_REVERSE_WEIGHT * (1 - weight) * F.relu(margin - margin_now))
    mask = mask.to(per_sample.dtype)
    if mask.sum() == 0:
        return per_sample.sum() * 0
    return (per_sample * mask).sum() / mask.sum()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean squared error of each sample."""
    return (prediction.float() - target.float()).pow(2).mean(dim=list(range(1, prediction.dim())))


def cpo_terms(batch: dict, parts: StableDiffusionParts, controlnet: torch.nn.Module, reference: torch.nn.Module,
              args, generator: torch.Generator, prediction: NoisePrediction) -> tuple[torch.Tensor, dict[str, float]]:
    """CPO's preference loss for one batch and what it logs.

    One new timestep and one new noise per image, the same for both conditions (CPO draws them
    apart from the plain diffusion loss's); the clean latents and text features are the plain
    step's. Winner and loser go through one batched forward of the trained ControlNet, then of the
    reference without gradient. The winner is never dropped (condition dropout acts on the plain loss).
    """
    latents, scheduler = prediction.latents, parts.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(args.timestep_sampling_start, args.timestep_sampling_end, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps).repeat(2, 1, 1, 1)
    both_t, text = timesteps.repeat(2), prediction.encoder_hidden_states.repeat(2, 1, 1)
    conditions = torch.cat([batch["conditioning_pixel_values"], batch["loser_conditioning_pixel_values"]])
    conditions = conditions.to(parts.weight_dtype)
    target = diffusion_target(scheduler, latents, noise, timesteps).repeat(2, 1, 1, 1)
    winner_loss, loser_loss = per_sample_mse(controlled_unet(parts, controlnet, noisy, both_t, text, conditions),
                                             target).chunk(2)
    with torch.no_grad():
        reference_winner, reference_loser = per_sample_mse(
            controlled_unet(parts, reference, noisy, both_t, text, conditions), target).chunk(2)
    loss = cpo_loss(winner_loss, loser_loss, reference_winner, reference_loser, args.beta_dpo, args.margin,
                    timesteps > 0)
    margin_now, reference_margin = (winner_loss - loser_loss).detach(), reference_winner - reference_loser
    logs = {"cpo_loss": loss.item(), "cpo_winner_loss": winner_loss.mean().item(),
            "cpo_loser_loss": loser_loss.mean().item(), "cpo_margin": margin_now.mean().item(),
            "cpo_reference_margin": reference_margin.mean().item(),
            # The trained model prefers the winner more than the reference does (DPO's implicit accuracy).
            "cpo_implicit_accuracy": (margin_now < reference_margin).float().mean().item(),
            "cpo_weight": preference_weight(margin_now, reference_margin, args.beta_dpo).mean().item()}
    return loss, logs


# --------------------------------------------------------------------------------------------
# 5. The loop: accumulation, clipping, non-finite steps, EMA, checkpoints and resume, validation, logs
# --------------------------------------------------------------------------------------------


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


def _tracker_config(args) -> dict:
    """Tensorboard's hparams accept only scalars and strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in config_dict(args).items()}


def train(args, accelerator, parts: StableDiffusionParts, rows: ControlNetRows, reward_model=None,
          reference: torch.nn.Module | None = None) -> None:
    """Train ``parts.controlnet`` on ``rows``; save checkpoints, validation grids and the final model.

    Writes to ``--output_dir``: ``training_config.json``; ``checkpoint-<N>/`` (accelerate state
    with ``controlnet/``, ``controlnet_ema/`` and ``training_config.json`` inside);
    ``validation/step-<N>/sample-<k>.png``; at the end the ControlNet in diffusers format in the
    folder itself (``ControlNetModel.from_pretrained(output_dir)``) and, with --use_ema, the EMA
    weights in ``controlnet_ema/``.
    """
    lock = lock_output_dir(accelerator, args.output_dir)  # before anything is written there
    try:
        _train(args, accelerator, parts, rows, reward_model, reference)
    finally:
        if lock is not None:
            lock.release()


def _train(args, accelerator, parts: StableDiffusionParts, rows: ControlNetRows, reward_model=None,
           reference: torch.nn.Module | None = None) -> None:
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
    validation = validation_inputs(args, rows, functools.partial(controlnet_condition, reward_model=reward_model),
                                   accelerator.device) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(args))

    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
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
                out = training_step(batch, parts, controlnet, args, generator, reward_model, global_step=global_step,
                                    reference=reference)
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
                append_train_log(args.output_dir, {"step": global_step, **logs})
            progress.set_postfix(loss=f"{logs['loss']:.4f}", reward=f"{logs['reward_loss']:.4f}")
            sums, micro_step, cycle_nonfinite, cycle_start = _zero_sums(), 0, False, time.perf_counter()

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(args, accelerator, parts, unwrapped, ema, validation, global_step, reward_model)
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
    for key, value in out.logs.items():
        sums[key] = sums.get(key, 0.0) + value


# --------------------------------------------------------------------------------------------
# 6. Main
# --------------------------------------------------------------------------------------------


def main(args) -> None:
    """Reward fine-tuning as ``args`` say (train_controlnet.py's main runs the same parts without a reward)."""
    accelerator = make_accelerator(args)
    parts = load_stable_diffusion(args, accelerator.device, weight_dtype_of(accelerator))
    if args.objective == "cpo":  # no reward model; the frozen starting ControlNet is CPO's reference
        reference = frozen_reference(parts.controlnet, accelerator.device.type, parts.weight_dtype)
        rows = build_train_rows(args, parts.tokenizer)
        train(args, accelerator, parts, rows, None, reference)
        return
    reward_model = load_reward_model(args, accelerator.device, parts.weight_dtype)
    resolve_label_column(args, reward_model)  # ADE20K without --label_column: the palette condition
    rows = build_train_rows(args, parts.tokenizer, reward_model)
    train(args, accelerator, parts, rows, reward_model)


if __name__ == "__main__":
    main(parse_args())
