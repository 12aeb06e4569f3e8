"""Registry of reward models, one per task (paper Sec. 3.2 and Table 1 of ControlNet++).

    from reward_models import build_reward_model
    reward_model = build_reward_model("hed", "work_dirs/toy/reward_models/ControlNetHED.pth")
    loss = reward_model.loss(reward_model(images), reward_model.target(batch))  # (B,)

Adding a task is adding one module with a ``RewardModel`` subclass and one entry below: the
class builds itself from the ``name_or_path`` values it accepts (``RewardModel.build``) and its
class attributes tell training, evaluation and inference everything task-specific, so that no
code outside this package branches on a task name. Heavy dependencies (transformers, mmseg)
are imported inside the constructors.
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
DEFAULT_REWARD_MODEL_PATHS: dict[str, str] = {task: model.default_name_or_path for task, model in REWARD_MODELS.items()}
# The tasks whose ControlNet condition the reward model computes from the image (the original's
# --conditioning_image_column canny|hed|lineart; stage one's --condition_detector).
CONDITION_DETECTORS: tuple[str, ...] = tuple(task for task, model in REWARD_MODELS.items()
                                             if not model.needs_condition_column)
TASK_ALIASES = {"seg": "segmentation"}  # the original release's evaluation --task_name value


def reward_class(task: str) -> type[RewardModel]:
    """The RewardModel subclass of ``task``; its class attributes describe the task."""
    if task not in REWARD_MODELS:
        raise ValueError(f"unknown reward task {task!r}; choose one of {sorted(REWARD_MODELS)} (--task).")
    return REWARD_MODELS[task]


def build_reward_model(
    task: str,
    name_or_path: str | None = None,
    checkpoint: str | None = None,
    label_format: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> RewardModel:
    """Build the frozen (eval, requires_grad False) reward model of ``task``: ``RewardModel.build``.

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
    return reward_class(task).build(name_or_path, checkpoint=checkpoint, label_format=label_format, device=device,
                                    dtype=dtype)


__all__ = ["CONDITION_DETECTORS", "DEFAULT_REWARD_MODEL_PATHS", "REWARD_MODELS", "RewardModel", "TASK_ALIASES",
           "build_reward_model", "reward_class"]
