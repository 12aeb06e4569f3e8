"""HED soft edges: the reward model and the condition extractor of the hed task.

The network is ControlNet 1.1's Apache-2 re-implementation of HED ("ControlNetHED.pth" of
lllyasviel/Annotators), so that the soft-edge ControlNet sees the maps it was trained on.
Its keys are ``norm``, ``block{1..5}.convs.{k}.weight|bias`` and
``block{1..5}.projection.weight|bias``; ``width`` (64 in the published file) is read from the
checkpoint so that the toy world can ship a small file with the same keys.

Defect 1 of the original release: its detector rounded the map to uint8 before the loss, so
the reward had no gradient. Here ``forward`` stays in floating point end to end; quantise
only where an image file is written.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardModel, load_published_state_dict, load_state_dict_strict

HED_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"
HED_WIDTH = 64  # published base width; blocks have width x (1, 2, 4, 8, 8) channels


class HEDBlock(nn.Module):
    """``num_convs`` 3x3 conv+ReLU, after an optional 2x2 max-pool, plus a 1x1 side output."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int):
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(in_channels if k == 0 else out_channels, out_channels, 3, padding=1) for k in range(num_convs)]
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, h: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """ControlNetHED_Apache2: input RGB on the 0..255 scale, output the five side logits."""

    def __init__(self, width: int = HED_WIDTH):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned mean, subtracted from the input
        channels = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        num_convs = [2, 2, 3, 3, 3]
        in_channels = [3] + channels[:-1]
        for index in range(5):
            self.add_module(f"block{index + 1}", HEDBlock(in_channels[index], channels[index], num_convs[index]))

    def forward(self, images_255: torch.Tensor) -> list[torch.Tensor]:
        h = images_255 - self.norm
        side_outputs = []
        for index in range(5):
            h, projection = getattr(self, f"block{index + 1}")(h, downsample=index > 0)
            side_outputs.append(projection)
        return side_outputs


class HEDRewardModel(RewardModel):
    """HED map (B, 1, H, W) in [0, 1]; reward MSE(HED(gen), HED(real)) mean over H, W."""

    task = "hed"
    default_name_or_path = HED_URL
    metric_script = "eval/eval_edge.py"
    title = "SoftEdge (HED)"
    released_controlnet_subfolder = "checkpoints/hed/controlnet"

    def __init__(self, width: int = HED_WIDTH):
        super().__init__()
        self.network = HEDNetwork(width)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = HED_URL) -> "HEDRewardModel":
        path, state_dict = load_published_state_dict(
            name_or_path, task="hed", kind="ControlNetHED", what="HED checkpoint",
            file_name="ControlNetHED.pth", marker_key="block1.convs.0.weight", url=HED_URL)
        model = cls(width=state_dict["block1.convs.0.weight"].shape[0])
        load_state_dict_strict(model.network, state_dict, "HED checkpoint", path)
        return model

    def side_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five side logits (B, 1, H, W), upsampled (bilinear) to the input size."""
        self._check_images(images)
        height, width = images.shape[-2:]
        # The network was trained on 0..255 RGB; clamp like the annotator (values outside
        # [0, 1] cannot come from an image) but do not round (defect 1).
        images_255 = (images.to(self.dtype) * 255.0).clamp(0, 255)
        side_outputs = self.network(images_255)
        return [F.interpolate(side, size=(height, width), mode="bilinear", align_corners=False) for side in side_outputs]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side_outputs = self.side_outputs(images)
        return torch.sigmoid(torch.stack(side_outputs, dim=0).mean(dim=0))

    @torch.no_grad()
    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).float().repeat(1, 3, 1, 1)

    @torch.no_grad()
    def condition_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The map as the original's evaluation stored it: its detector fused the side outputs as
        ``1 / (1 + exp(-mean))`` over a stack on dim 1 (written out here: ``torch.sigmoid`` and another
        stacking order can differ in the last bit, which truncation turns into a level), returned
        ``uint8(clip(p * 255)) / 255``, and ``to_pil_image`` wrote ``(that * 255).byte()``: the map
        truncated to uint8 (the second step gives back every level k exactly in float32)."""
        fused = 1 / (1 + torch.exp(-torch.mean(torch.stack(self.side_outputs(images), dim=1), dim=1)))
        levels = (fused.float() * 255.0).clip(0, 255).to(torch.uint8)
        return ((levels / 255.0) * 255).to(torch.uint8).repeat(1, 3, 1, 1)
