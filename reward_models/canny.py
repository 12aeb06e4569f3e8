"""Canny: the reward model and the condition extractor of the canny task.

Training (the original's ``train/canny_tools.py``): kornia's Canny with thresholds low 0.1 /
high 0.2, a 5x5 Gaussian of sigma 1 and *no hysteresis*: grayscale -> blur -> unnormalised
Sobel -> magnitude sqrt(gx^2 + gy^2 + eps) -> non-maximum suppression along the gradient
direction rounded to 45 degrees (magnitude times the is-local-max mask, so it stays
differentiable).
- reward output: the magnitude after NMS (B, 1, H, W); it is not bounded by 1.
- ControlNet input in training (``extract_condition``): that magnitude with values at or below
  the low threshold set to 0, x3 channels, *not clamped* (up to ~2.6 on a hard edge), as the
  original fed it.

Evaluation and inference (the original's ``eval/eval.py`` and demo, ``annotate``): kornia's
Canny *with* hysteresis, a binary 0 / 1 edge map, which is also what lllyasviel's canny
ControlNet was trained on.

kornia is pinned to 0.7.0, the original's version: its NMS drops both pixels of an exact tie
across an edge (0.9 keeps one), which shows on pixel-aligned shapes.
There are no weights; ``name_or_path`` must be ``canny`` (the original flag value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RewardModel

LOW_THRESHOLD = 0.1
HIGH_THRESHOLD = 0.2  # hysteresis threshold (evaluation and inference); training has no hysteresis
GAUSSIAN_KERNEL_SIZE = (5, 5)
GAUSSIAN_SIGMA = (1.0, 1.0)


def canny_magnitude(images: torch.Tensor) -> torch.Tensor:
    """NMS gradient magnitude (B, 1, H, W), float32, of RGB images in [0, 1] of any float dtype.

    Computed in float32 whatever the input dtype: in fp16 the squared Sobel responses and the
    45-degree rounding of the direction lose enough precision to move edges.
    """
    import kornia

    with torch.autocast(device_type=images.device.type, enabled=False):
        magnitude, _ = kornia.filters.canny(
            images.float(),
            low_threshold=LOW_THRESHOLD,
            high_threshold=HIGH_THRESHOLD,
            kernel_size=GAUSSIAN_KERNEL_SIZE,
            sigma=GAUSSIAN_SIGMA,
            hysteresis=False,
        )
    return magnitude


def binary_canny(images: torch.Tensor, low_threshold: float = LOW_THRESHOLD,
                 high_threshold: float = HIGH_THRESHOLD) -> torch.Tensor:
    """Edges (B, 1, H, W) in {0, 1}: ``kornia.filters.canny(images, low, high)[1]`` with its defaults
    (5x5 Gaussian, sigma 1, hysteresis), exactly the call of the original's evaluation and demo."""
    import kornia

    with torch.autocast(device_type=images.device.type, enabled=False):
        return kornia.filters.canny(images.float(), low_threshold, high_threshold)[1]


def canny_edges(magnitude: torch.Tensor) -> torch.Tensor:
    """The condition map: magnitude with values at or below the low threshold set to 0."""
    return F.threshold(magnitude, LOW_THRESHOLD, 0.0)


class CannyRewardModel(RewardModel):
    """Canny has no weights; the reward compares NMS magnitudes (MSE over C, H, W)."""

    task = "canny"
    default_name_or_path = "canny"
    has_weights = False
    binary_annotation = True
    annotation_thresholds = (LOW_THRESHOLD, HIGH_THRESHOLD)  # the original demo's and evaluation's
    metric_script = "eval/eval_edge.py"
    title = "Canny"
    released_controlnet_subfolder = "checkpoints/canny/controlnet"

    def __init__(self, device: torch.device | str | None = None):
        super().__init__()
        # No parameters: remember the device so `target` can move the batch there.
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str = "canny") -> "CannyRewardModel":
        if name_or_path != "canny":
            raise ValueError(
                f"the canny reward model has no weights; --reward_model_name_or_path must be 'canny', got {name_or_path!r}."
            )
        return cls()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _apply(self, fn, recurse=True):
        # Keep `device` in sync with `.to(...)` / `.cuda()` although there are no tensors.
        self._device = fn(torch.empty(0, device=self._device)).device
        return super()._apply(fn, recurse)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return canny_magnitude(images)

    @torch.no_grad()
    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:
        """The training input: thresholded NMS magnitude, unclamped as in the original."""
        self._check_images(images)
        return canny_edges(canny_magnitude(images)).repeat(1, 3, 1, 1)

    @torch.no_grad()
    def annotate(self, images: torch.Tensor, low_threshold: float = LOW_THRESHOLD,
                 high_threshold: float = HIGH_THRESHOLD) -> torch.Tensor:
        """Evaluation / inference edges: binary (0 / 1) after hysteresis, x3 channels."""
        self._check_images(images)
        return binary_canny(images, low_threshold, high_threshold).repeat(1, 3, 1, 1)
