"""Depth: DPT (MiDaS) through transformers, the reward model of the depth task.

The paper rewards with DPT-Hybrid MiDaS (``Intel/dpt-hybrid-midas``) and evaluates with
``Intel/dpt-large``; both load here from a hub id or a local folder written by
``save_pretrained``. A local folder never touches the network.

Both sides are scale-free, as the original: the prediction, resized to the image size, is
divided by its per-sample max; the label (channel mean of the control_depth image) likewise.
Defect 4 of the original release: it normalised with ``reshape(batch_size, ...)`` using the
configured batch size and failed on a short last batch; here every reduction is per sample.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .base import RewardModel

DPT_INPUT_SIZE = 384  # DPT-Hybrid's training resolution; a local preprocessor_config.json overrides it
DPT_MEAN = 0.5
DPT_STD = 0.5
# Clamp for the per-sample max, so an all-zero depth map stays zero instead of becoming NaN.
MAX_EPSILON = 1e-6


def normalize_by_max(depth: torch.Tensor) -> torch.Tensor:
    """Divide each sample of a (B, ...) map by its own max (clamped to MAX_EPSILON)."""
    peak = depth.flatten(1).amax(dim=1).clamp_min(MAX_EPSILON)
    return depth / peak.view(-1, *([1] * (depth.ndim - 1)))


def _input_size_from_folder(folder: Path) -> tuple[int, int]:
    """(height, width) from the folder's preprocessor_config.json, else 384 x 384."""
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return DPT_INPUT_SIZE, DPT_INPUT_SIZE
    size = json.loads(config_file.read_text()).get("size", DPT_INPUT_SIZE)
    if isinstance(size, int):
        return size, size
    return int(size["height"]), int(size["width"])


class DepthRewardModel(RewardModel):
    """Relative depth (B, 1, H, W) in [0, 1] per sample; reward MSE mean over H, W."""

    task = "depth"
    default_name_or_path = "Intel/dpt-hybrid-midas"
    needs_condition_column = True  # the label is the dataset's control_depth column
    default_condition_column = "control_depth"
    evaluation_label_column = "control_depth"
    metric_script = "eval/eval_depth.py"
    title = "Depth"
    released_controlnet_subfolder = "checkpoints/depth/controlnet"

    def __init__(self, dpt_model: torch.nn.Module, input_size: tuple[int, int] = (DPT_INPUT_SIZE, DPT_INPUT_SIZE)):
        super().__init__()
        self.dpt = dpt_model
        self.input_size = tuple(input_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "Intel/dpt-hybrid-midas") -> "DepthRewardModel":
        from transformers import DPTForDepthEstimation

        folder = Path(str(name_or_path)).expanduser()
        if folder.is_dir():
            dpt = DPTForDepthEstimation.from_pretrained(str(folder), local_files_only=True)
            return cls(dpt, _input_size_from_folder(folder))
        if str(name_or_path).startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"DPT folder {name_or_path} does not exist; pass a folder written by save_pretrained "
                "or a hub id such as Intel/dpt-hybrid-midas with --reward_model_name_or_path."
            )
        try:
            dpt = DPTForDepthEstimation.from_pretrained(str(name_or_path))
        except OSError as error:
            raise RuntimeError(
                f"Could not load the DPT depth model {name_or_path!r} ({error}). Without network, download it "
                f"elsewhere (`huggingface-cli download {name_or_path} --local-dir DIR`) and pass DIR with "
                "--reward_model_name_or_path."
            ) from error
        return cls(dpt, (DPT_INPUT_SIZE, DPT_INPUT_SIZE))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        height, width = images.shape[-2:]
        x = F.interpolate(images.to(self.dtype), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - DPT_MEAN) / DPT_STD
        predicted = self.dpt(pixel_values=x).predicted_depth.unsqueeze(1)  # (B, 1, h, w)
        predicted = F.interpolate(predicted.float(), size=(height, width), mode="bilinear", align_corners=False)
        return normalize_by_max(predicted)

    @torch.no_grad()
    def target(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "conditioning_pixel_values" not in batch:
            raise KeyError(
                "the depth reward needs batch['conditioning_pixel_values'] (the control_depth column); "
                "pass --conditioning_image_column control_depth."
            )
        depth = batch["conditioning_pixel_values"].float().mean(dim=1, keepdim=True)
        return normalize_by_max(depth).to(self.device)

    @torch.no_grad()
    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).clamp(0, 1).repeat(1, 3, 1, 1)

    def label_annotation(self, label_image, resolution: int) -> np.ndarray:
        return depth_label(label_image, resolution)


def depth_label(label_image, resolution: int) -> np.ndarray:
    """The depth annotation (H, W) uint8 as the original's eval.py wrote it: the full-size map
    min-max normalised to 0..255 in float64, truncated to uint8, resized nearest, read as grey."""
    from PIL import Image

    array = np.array(label_image).astype(np.float64)
    span = array.max() - array.min()
    # The original divided by the span unchecked (a flat map gave NaN); a flat map is 0 here.
    normalised = (array - array.min()) / span * 255 if span > 0 else np.zeros_like(array)
    image = Image.fromarray(normalised.astype("uint8")).resize((resolution, resolution), Image.NEAREST)
    return np.asarray(image.convert("L"))
