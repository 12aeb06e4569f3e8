"""What one generation is, shared by the command line (`generate.py`) and the demo (`app.py`).

One generation is: read an image, resize it so its shorter side is `resolution` (aspect ratio
kept, both sides multiples of 8), extract the task's condition with its annotator (the reward
model of training, as the original's evaluation and demo computed it: `RewardModel.annotate`; canny
is kornia's Canny with hysteresis, a binary map; see `inference/models.py`), and run Stable
Diffusion 1.5 + ControlNet with UniPC, as in the paper's evaluation protocol. A ready-made
condition image skips the annotator.

Every error a user can cause (a missing file, an unreadable image, a folder that is not a
ControlNet, weights that cannot be fetched offline) is raised as `InferenceError`, whose message
names the flag or file and says what to do; the entry points print it without a traceback.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reward_models import REWARD_MODELS
from reward_models.canny import HIGH_THRESHOLD, LOW_THRESHOLD
from utils.images import to_mode

TASKS = tuple(REWARD_MODELS)

# The paper's evaluation protocol (UniPC, 20 steps, CFG 7.5, this negative prompt, seed 42).
DEFAULT_NEGATIVE_PROMPT = "worst quality, low quality"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SEED = 42
DEFAULT_RESOLUTION = 512
# The original demo's and evaluation's Canny thresholds (kornia's scale: gradient magnitude of
# [0, 1] images), with hysteresis: the binary edges lllyasviel's canny ControlNet was trained on.
DEFAULT_CANNY_LOW_THRESHOLD, DEFAULT_CANNY_HIGH_THRESHOLD = LOW_THRESHOLD, HIGH_THRESHOLD
# The toy world's models are built for 64 px images (8x8 latents).
TOY_RESOLUTION = 64


class InferenceError(Exception):
    """An error the user can fix; the message says how."""


def sentence(error: BaseException) -> str:
    """An exception's message ending with exactly one full stop, to embed in a longer message."""
    return str(error).strip().rstrip(".") + "."


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for flags that have a default (not for None / off switches)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Devices, sizes, images
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device_and_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when available, else CPU in fp32 (half precision on CPU is slow or unsupported)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved_device = torch.device(device)
    except RuntimeError as error:
        raise InferenceError(
            f"--device {device!r} is not a torch device ({error}); use cpu, cuda or cuda:N.") from error
    if resolved_device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {device} was asked for but CUDA is not available here; use --device cpu.")
    if dtype is None:
        dtype = "fp16" if resolved_device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    if resolved_device.type == "cpu" and dtype == "fp16":
        raise InferenceError("--dtype fp16 is not supported on CPU (several kernels are missing); use fp32 or bf16.")
    return resolved_device, DTYPES[dtype]


def generation_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `resolution`, both rounded to multiples of 8.

    Multiples of 8 because the VAE maps 8x8 pixels to one latent. The aspect ratio is kept up
    to that rounding.
    """
    if resolution < 8:
        raise InferenceError(f"--resolution must be at least 8, got {resolution}.")
    scale = resolution / min(width, height)

    def round8(side: float) -> int:
        return max(8, int(round(side * scale / 8.0)) * 8)

    return round8(width), round8(height)


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Read an image file as RGB, with an error that names the file when it cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InferenceError(f"{what}: {path} does not exist" + (" (it is a folder)." if path.is_dir() else "."))
    try:
        with Image.open(path) as image:
            return to_mode(image, "RGB")  # 16-bit, palette, CMYK, alpha: as training reads them
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InferenceError(f"{what}: cannot read {path} as an image ({error}); pass a PNG or JPEG file.") from error


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(to_mode(image, "RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> RGB PIL image (rounded to the nearest 8-bit value)."""
    if image.ndim == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def resize_image(image: Image.Image, size: tuple[int, int], nearest: bool = False) -> Image.Image:
    """Resize to `size` (width, height): bicubic for photos, nearest for label-like images."""
    if image.size == tuple(size):
        return image
    return image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate_images(pipe, condition: Image.Image, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                    num_images: int = 1, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                    controlnet_conditioning_scale: float = 1.0, seed: int = DEFAULT_SEED) -> list[Image.Image]:
    """`num_images` images of the condition's size; the same seed gives the same images.

    The noise comes from a CPU generator so that a seed means the same images on any device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            image=condition,
            width=condition.width,
            height=condition.height,
            num_images_per_prompt=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            generator=generator,
        )
    return list(result.images)
