"""Registry of reward models, one per task (paper Sec. 3.2 and Table 1 of ControlNet++).

    from reward_models import build_reward_model
    reward_model = build_reward_model("hed", "work_dirs/toy/reward_models/ControlNetHED.pth")
    loss = reward_model.loss(reward_model(images), reward_model.target(batch))  # (B,)

Adding a task is adding one module with a ``RewardModel`` subclass and one entry below.
Heavy dependencies (transformers, mmseg) are imported inside the constructors.
"""
from __future__ import annotations

import torch

from .base import RewardModel
from .canny import CannyRewardModel
from .depth import DepthRewardModel
from .hed import HEDRewardModel
from .lineart import LineArtRewardModel
from .segmentation import SegmentationRewardModel

REWARD_MODELS: dict[str, type[RewardModel]] = {
    "canny": CannyRewardModel,
    "hed": HEDRewardModel,
    "lineart": LineArtRewardModel,
    "depth": DepthRewardModel,
    "segmentation": SegmentationRewardModel,
}

# The paper's reward models, as the original release's --reward_model_name_or_path values.
DEFAULT_REWARD_MODEL_PATHS: dict[str, str] = {
    "canny": "canny",
    "hed": "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth",
    "lineart": "https://huggingface.co/spaces/awacke1/Image-to-Line-Drawings/resolve/main/model.pth",
    "depth": "Intel/dpt-hybrid-midas",
    "segmentation": "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py",
}


def build_reward_model(
    task: str,
    name_or_path: str | None = None,
    checkpoint: str | None = None,
    label_format: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> RewardModel:
    """Build the frozen (eval, requires_grad False) reward model of ``task``.

    name_or_path: the original ``--reward_model_name_or_path`` value or a local equivalent;
        None picks the paper's model (``DEFAULT_REWARD_MODEL_PATHS``).
    checkpoint: segmentation only, an explicit checkpoint path or URL for the mmseg config;
        None takes the model-zoo checkpoint of an ``mmseg::`` config or the ``.pth`` of a folder;
        "random" builds the config with random weights and loads nothing (tests, smoke runs).
    label_format: segmentation only, "ade20k_palette", "index" or "index_reduce_zero";
        None infers it from the config's dataset.
    dtype: the weights' dtype (the mixed-precision dtype in training). Inputs of any float
        dtype are accepted; losses are float32.
    """
    if task not in REWARD_MODELS:
        raise ValueError(f"unknown reward task {task!r}; choose one of {sorted(REWARD_MODELS)} (--task).")
    if name_or_path is None:
        name_or_path = DEFAULT_REWARD_MODEL_PATHS[task]
    if task != "segmentation" and (checkpoint is not None or label_format is not None):
        raise ValueError(f"checkpoint and label_format are for the segmentation task only, not {task!r}.")
    if task == "canny":
        if name_or_path != "canny":
            raise ValueError(
                f"the canny reward model has no weights; --reward_model_name_or_path must be 'canny', got {name_or_path!r}."
            )
        model: RewardModel = CannyRewardModel(device=device)
    elif task == "segmentation":
        model = SegmentationRewardModel.from_pretrained(name_or_path, checkpoint=checkpoint, label_format=label_format)
    else:
        model = REWARD_MODELS[task].from_pretrained(name_or_path)
    model = model.to(device=device if device is not None else "cpu")
    if task != "canny":
        model = model.to(dtype=dtype)
    return model.freeze()


__all__ = ["REWARD_MODELS", "DEFAULT_REWARD_MODEL_PATHS", "RewardModel", "build_reward_model"]
