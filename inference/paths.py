"""Where the models come from: Stable Diffusion and ControlNet folders or hub ids, the released
ControlNet++ weights, and the toy world of `--toy`, each checked before minutes of loading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from inference.generation import InferenceError, sentence
from reward_models import reward_class

# Stable Diffusion 1.5, the paper's base model. runwayml/stable-diffusion-v1-5 was removed from
# the hub in 2024; this is its official mirror with the same files.
DEFAULT_SD_PATH = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The released ControlNet++ weights are not in a model repository but in the paper's Hugging
# Face *Space*, one diffusers folder per task (``RewardModel.released_controlnet_subfolder``).
CONTROLNET_PLUS_PLUS_SPACE = "limingcv/ControlNet-Plus-Plus"

CONTROLNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


def looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is `owner/name`; anything else with a path shape is meant as a local path."""
    from utils.flags import looks_local

    return looks_local(str(name_or_path))  # also `work_dirs/x` when work_dirs/ exists


def _class_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def resolve_controlnet_path(name_or_path: str | None, task: str | None, flag: str = "--controlnet_path") -> str:
    """A local ControlNet folder (config.json + weights) or a hub id, checked before loading.

    Accepts, besides a plain diffusers ControlNet folder: the output folder of
    `train/reward_control.py` (the same layout), one of its checkpoint folders
    (`<output_dir>/checkpoint-<N>/`, whose `controlnet/` is used) and that `controlnet/` folder
    itself. `None` means the released ControlNet++ weights of `task`, fetched from the
    paper's Space.
    """
    if name_or_path is None:
        if task is None:
            raise InferenceError(f"{flag} is required with a ready-made --condition and no --task.")
        return download_controlnet_plus_plus(task, flag)
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        if looks_like_local_path(str(name_or_path)):
            raise InferenceError(f"{flag} {name_or_path}: no such folder.")
        return str(name_or_path)  # a hub id: diffusers downloads it (or finds it in the cache)
    if path.is_file():
        raise InferenceError(
            f"{flag} {path} is a file; pass the folder holding config.json and "
            "diffusion_pytorch_model.safetensors (a diffusers ControlNet)."
        )
    if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a training checkpoint folder: checkpoint-<N>/controlnet/
    if not (path / "config.json").is_file():
        if (path / "model_index.json").is_file():
            raise InferenceError(
                f"{flag} {path} is a full Stable Diffusion pipeline, not a ControlNet; pass it as --sd_path "
                "and give the ControlNet folder to " + flag + "."
            )
        checkpoints = sorted(path.glob("checkpoint-*/controlnet"), key=lambda p: _checkpoint_step(p.parent))
        if checkpoints:
            raise InferenceError(
                f"{flag} {path} holds training checkpoints but no final ControlNet (the run did not finish); "
                f"pass one of them, e.g. {checkpoints[-1].parent}."
            )
        raise InferenceError(
            f"{flag} {path} is not a ControlNet folder: it has no config.json. Pass a diffusers ControlNet "
            "folder (config.json + diffusion_pytorch_model.safetensors), e.g. the output of train/reward_control.py."
        )
    class_name = _class_name(path)
    if class_name != "ControlNetModel":
        raise InferenceError(
            f"{flag} {path} holds a {class_name or 'non-diffusers'} model (config.json _class_name), not a "
            "ControlNetModel. Pass a ControlNet folder; the Stable Diffusion folder goes to --sd_path."
        )
    if not any((path / name).is_file() for name in CONTROLNET_WEIGHT_FILES):
        raise InferenceError(
            f"{flag} {path} has a ControlNet config.json but no weights (diffusion_pytorch_model.safetensors "
            "or .bin); the folder was copied incompletely or the save was interrupted."
        )
    return str(path)


def _checkpoint_step(folder: Path) -> int:
    try:
        return int(folder.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def download_controlnet_plus_plus(task: str, flag: str = "--controlnet_path") -> str:
    """Local folder of the released ControlNet++ weights of `task` (downloaded once, then cached)."""
    from huggingface_hub import snapshot_download

    subfolder = reward_class(task).released_controlnet_subfolder
    try:
        root = snapshot_download(CONTROLNET_PLUS_PLUS_SPACE, repo_type="space", allow_patterns=[f"{subfolder}/*"])
    except Exception as error:  # offline, proxy, hub error: all end in the same advice
        raise InferenceError(
            f"could not fetch the released ControlNet++ {task} weights ({subfolder} of the Hugging Face Space "
            f"{CONTROLNET_PLUS_PLUS_SPACE}): {type(error).__name__}: {sentence(error)} Without network, pass a local "
            f"ControlNet folder with {flag} (or --toy DIR to try the toy world)."
        ) from error
    return str(Path(root) / subfolder)


def resolve_sd_path(name_or_path: str) -> str:
    """A local Stable Diffusion pipeline folder (checked for model_index.json) or a hub id."""
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            is_controlnet = _class_name(path) == "ControlNetModel"
            hint = " It looks like a ControlNet; pass it as --controlnet_path." if is_controlnet else ""
            raise InferenceError(
                f"--sd_path {path} is not a diffusers Stable Diffusion folder (no model_index.json).{hint}"
            )
        return str(path)
    if looks_like_local_path(str(name_or_path)):
        raise InferenceError(f"--sd_path {name_or_path}: no such folder.")
    return str(name_or_path)


def load_from_hub_or_folder(load, name_or_path: str, flag: str):
    """Run a diffusers `from_pretrained` call, turning download failures into an actionable error."""
    try:
        return load()
    except (OSError, ValueError) as error:
        where = "folder" if Path(name_or_path).exists() else "hub id (is the network reachable?)"
        raise InferenceError(
            f"could not load {flag} {name_or_path} as a {where}: {sentence(error)} Pass a local diffusers folder."
        ) from error


def toy_model_paths(folder: str | os.PathLike, tasks: list[str]) -> tuple[str, str, dict]:
    """(SD path, ControlNet path, {task: annotator path}) of the toy world in `folder` (`--toy`),
    written there first (seed 0) if the folder holds none; for `tasks` whose annotator is needed."""
    from toy.world import read_toy_world  # test scaffolding: imported only for --toy

    try:
        world = read_toy_world(folder)
        return world.sd_path, world.controlnet_path, {task: world.annotator_path(task) for task in tasks}
    except (FileNotFoundError, FileExistsError) as error:
        raise InferenceError(f"--toy {folder}: {sentence(error)}") from error
