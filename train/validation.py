"""Validation images of train/reward_control.py, generated with the weights being trained.

Every --validation_steps optimizer steps the main process generates --num_validation_images
images per validation input with the training ControlNet (with --use_ema its EMA weights,
swapped in and back) and writes one grid per input, rows of (condition | generated | condition
extracted from the generated image by the reward model), to ``validation/step-<N>/sample-<k>.png``
and to the trackers (tensorboard, wandb). The pipeline is the evaluation's: UniPC, the frozen
parts of training, no safety checker.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

from utils.data import ControlNetRows, to_rgb
from utils.io import hstack_images, save_image, vstack_images

logger = logging.getLogger("controlnet_pp.train")


def validation_inputs(args, rows: ControlNetRows, condition_of: Callable[[dict], torch.Tensor],
                      device) -> list[tuple[str, torch.Tensor]]:
    """(prompt, condition (3,R,R) in [0,1]) pairs: the flags' images, or the first training rows.

    ``--validation_image`` files are condition images (as in diffusers). Without them, the first
    rows of the training set give the caption (its first one) and the condition the ControlNet
    was trained with: ``condition_of(batch)``, the training step's ``controlnet_condition`` (the
    dataset column, or extracted from the image by the reward model).
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
        condition = condition_of(batch)[0].float().cpu()
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
def log_validation(args, accelerator, parts, controlnet, inputs, step: int, reward_model=None):
    """One grid per input: rows of (condition | generated | condition extracted from the generated
    image by the reward model), one row per generated image; PNG in validation/step-<N>/ and to
    the trackers. ``parts``: the script's StableDiffusionParts; ``controlnet`` is the unwrapped model
    with the weights to show."""
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


def validate(args, accelerator, parts, unwrapped, ema, inputs, step, reward_model) -> None:
    """Validation with the EMA weights when there is an EMA, swapped in and restored (defect 3)."""
    was_training = unwrapped.training
    unwrapped.eval()
    context = ema.swapped_into(unwrapped) if ema is not None else contextlib.nullcontext()
    with context, _half_precision_outputs(unwrapped):
        out_dir = log_validation(args, accelerator, parts, unwrapped, inputs, step, reward_model)
    unwrapped.train(was_training)
    logger.info(f"Validation images in {out_dir}")
