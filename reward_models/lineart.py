"""Line drawings: the reward model and the condition extractor of the lineart task.

The network is the generator of "Learning to generate line drawings that convey geometry and
semantics" (Chan et al., CVPR 2022), the ``model.pth`` of the awacke1/Image-to-Line-Drawings
space that ControlNet 1.1's lineart annotator uses. Its output is 1 on white paper and 0 on
ink; the ControlNet input is the inverted drawing ``1 - LD(image)`` (white lines on black).
The reward compares un-inverted drawings, as the original release does.

Keys are ``model0.*`` .. ``model4.*`` following the Sequential order below; ``ngf`` (64 in the
published file) is read from the checkpoint so the toy world can ship a small one.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardModel, load_published_state_dict, load_state_dict_strict

LINEART_URL = "https://huggingface.co/spaces/awacke1/Image-to-Line-Drawings/resolve/main/model.pth"
LINEART_NGF = 64
NUM_RESIDUAL_BLOCKS = 3  # the lineart annotator's Generator(3, 1, 3)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineDrawingNetwork(nn.Module):
    """RGB in [0, 1] -> drawing (B, 1, H, W) in [0, 1]; H and W must be multiples of 4."""

    def __init__(self, ngf: int = LINEART_NGF, num_residual_blocks: int = NUM_RESIDUAL_BLOCKS):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU())
        self.model1 = nn.Sequential(
            nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * ngf), nn.ReLU(),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * ngf), nn.ReLU(),
        )
        self.model2 = nn.Sequential(*[ResidualBlock(4 * ngf) for _ in range(num_residual_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(2 * ngf), nn.ReLU(),
            nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(ngf), nn.ReLU(),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, 7), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(images)))))


class LineArtRewardModel(RewardModel):
    """Line drawing (B, 1, H, W) in [0, 1], 1 = paper; reward MSE mean over H, W."""

    task = "lineart"
    default_name_or_path = LINEART_URL
    paper_protocol_wraps_inversion = True
    metric_script = "eval/eval_edge.py"
    title = "LineArt"
    released_controlnet_subfolder = "checkpoints/lineart/controlnet"

    def __init__(self, ngf: int = LINEART_NGF):
        super().__init__()
        self.network = LineDrawingNetwork(ngf)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = LINEART_URL) -> "LineArtRewardModel":
        path, state_dict = load_published_state_dict(
            name_or_path, task="lineart", kind="line drawing", what="line drawing checkpoint",
            file_name="model.pth", marker_key="model0.1.weight", url=LINEART_URL)
        model = cls(ngf=state_dict["model0.1.weight"].shape[0])
        load_state_dict_strict(model.network, state_dict, "line drawing checkpoint", path)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        height, width = images.shape[-2:]
        # Two stride-2 convs and two transposed convs only give back H x W when both are
        # multiples of 4; pad by reflection up to one and crop the drawing back.
        pad_bottom, pad_right = -height % 4, -width % 4
        x = images.to(self.dtype)
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect")
        return self.network(x)[..., :height, :width]

    @torch.no_grad()
    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:
        return (1 - self(images).float()).repeat(1, 3, 1, 1)

    @torch.no_grad()
    def condition_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Input condition / label as the original's evaluation stored it: ``1 - drawing`` in float,
        then ``to_pil_image``'s truncation ``(x * 255).byte()``."""
        return ((1 - self(images).float()) * 255).to(torch.uint8).repeat(1, 3, 1, 1)

    @torch.no_grad()
    def extracted_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """A generated image's map in the ControlNet format, ``255 - (drawing * 255).byte()``: the
        original stored the *un-inverted* drawing truncated, ``(drawing * 255).byte()``; storing its
        exact uint8 complement keeps that file recoverable bit for bit (255 - stored), which the
        paper protocol's scoring needs (it inverts it with the uint8 wrap-around, defect 2)."""
        return (255 - (self(images).float() * 255).to(torch.uint8)).repeat(1, 3, 1, 1)
