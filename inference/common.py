"""Model loading and generation shared by the command line (`generate.py`) and the demo (`app.py`).

One generation is: read an image, resize it so its shorter side is `resolution` (aspect ratio
kept, both sides multiples of 8), extract the task's condition with its annotator (the reward
model of training, as the original's evaluation and demo computed it: `RewardModel.annotate`; canny
is kornia's Canny with hysteresis, a binary map), and run Stable Diffusion 1.5
+ ControlNet with UniPC, as in the paper's evaluation protocol. A ready-made condition image
skips the annotator.

Every error a user can cause (a missing file, an unreadable image, a folder that is not a
ControlNet, weights that cannot be fetched offline) is raised as `InferenceError`, whose message
names the flag or file and says what to do; the entry points print it without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.images import to_mode
from utils.io import hstack_images

TASKS = ("canny", "hed", "lineart", "depth", "segmentation")

# Stable Diffusion 1.5, the paper's base model. runwayml/stable-diffusion-v1-5 was removed from
# the hub in 2024; this is its official mirror with the same files.
DEFAULT_SD_PATH = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The released ControlNet++ weights are not in a model repository but in the paper's Hugging
# Face *Space*, one diffusers folder per task (the segmentation one is the ADE20K model).
CONTROLNET_PLUS_PLUS_SPACE = "limingcv/ControlNet-Plus-Plus"
CONTROLNET_PLUS_PLUS_SUBFOLDERS = {
    "canny": "checkpoints/canny/controlnet",
    "hed": "checkpoints/hed/controlnet",
    "lineart": "checkpoints/lineart/controlnet",
    "depth": "checkpoints/depth/controlnet",
    "segmentation": "checkpoints/seg/controlnet",
}

# The paper's evaluation protocol (UniPC, 20 steps, CFG 7.5, this negative prompt, seed 42).
DEFAULT_NEGATIVE_PROMPT = "worst quality, low quality"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SEED = 42
DEFAULT_RESOLUTION = 512
# The original demo's and evaluation's Canny thresholds (kornia's scale: gradient magnitude of
# [0, 1] images), with hysteresis: the binary edges lllyasviel's canny ControlNet was trained on.
DEFAULT_CANNY_LOW_THRESHOLD = 0.1
DEFAULT_CANNY_HIGH_THRESHOLD = 0.2
# The toy world's models are built for 64 px images (8x8 latents).
TOY_RESOLUTION = 64

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CONTROLNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


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


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images side by side in one row (all resized to the first one's height)."""
    height = images[0].height
    return hstack_images([im if im.height == height else im.resize((round(im.width * height / im.height), height))
                          for im in images])


# ---------------------------------------------------------------------------------------------
# Model paths
# ---------------------------------------------------------------------------------------------


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

    subfolder = CONTROLNET_PLUS_PLUS_SUBFOLDERS[task]
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


def _load_from_hub_or_folder(load, name_or_path: str, flag: str):
    """Run a diffusers `from_pretrained` call, turning download failures into an actionable error."""
    try:
        return load()
    except (OSError, ValueError) as error:
        where = "folder" if Path(name_or_path).exists() else "hub id (is the network reachable?)"
        raise InferenceError(
            f"could not load {flag} {name_or_path} as a {where}: {sentence(error)} Pass a local diffusers folder."
        ) from error


# ---------------------------------------------------------------------------------------------
# Toy world
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyWorld:
    """The model paths of a toy world (`utils/toy.py`), read from its toy_world.json."""

    root: Path
    sd_path: str
    controlnet_path: str
    reward_models: dict = field(default_factory=dict)  # task -> path of its annotator weights

    def annotator_path(self, task: str) -> str | None:
        """The toy annotator of `task` (None for canny, which has no weights).

        A toy world without it fails here rather than falling back to the paper's weights, which
        would be a download in the middle of a toy run.
        """
        if task == "canny":
            return None
        if task not in self.reward_models:
            raise InferenceError(
                f"the toy world {self.root} has no {task} annotator (written by an older utils/toy.py?); "
                "delete the folder and run again to rewrite it.")
        return self.reward_models[task]


def load_toy_world(folder: str | os.PathLike, create: bool = True) -> ToyWorld:
    """Read `folder/toy_world.json`; write the toy world (seed 0) first if the folder has none."""
    from utils.toy import MANIFEST_NAME, make_toy_world

    root = Path(folder).expanduser()
    manifest_file = root / MANIFEST_NAME
    if manifest_file.is_file():
        # Read, not re-made: make_toy_world would replace a world written with another seed.
        manifest = json.loads(manifest_file.read_text())
        paths = _absolute_paths(manifest["paths"], root)
    elif create:
        print(f"no toy world at {root}: writing one (seed 0, a few seconds)")
        paths = make_toy_world(root, seed=0)["paths"]
    else:
        raise InferenceError(
            f"--toy {root} holds no {MANIFEST_NAME}; write one with `python -m utils.toy --out {root}`.")
    return ToyWorld(
        root=root.resolve(),
        sd_path=paths["sd15"],
        controlnet_path=paths["controlnet"],
        reward_models=toy_annotator_paths(paths.get("reward_models", {})),
    )


def _absolute_paths(value, root: Path):
    if isinstance(value, dict):
        return {key: _absolute_paths(item, root) for key, item in value.items()}
    return str((root / value).resolve())


def toy_annotator_paths(reward_model_paths: dict) -> dict:
    """task -> `--reward_model_name_or_path` value, from the toy manifest's reward_models entry."""
    # The toy world ships an ADE20K and a COCO-Stuff segmenter; the demo's segmentation
    # ControlNet (like the released one) is the ADE20K model.
    keys = {"hed": "hed", "lineart": "lineart", "depth": "depth", "segmentation": "segmentation_ade20k"}
    return {task: reward_model_paths[key] for task, key in keys.items() if key in reward_model_paths}


# ---------------------------------------------------------------------------------------------
# Annotators (condition extractors)
# ---------------------------------------------------------------------------------------------


class CannyAnnotator:
    """Canny edges with chosen thresholds, as the original's demo and evaluation computed them:
    ``kornia.filters.canny(image, low, high)`` with hysteresis, a binary map repeated to 3 channels
    (`reward_models.canny.CannyRewardModel.annotate` with other thresholds)."""

    def __init__(self, low_threshold: float = DEFAULT_CANNY_LOW_THRESHOLD,
                 high_threshold: float = DEFAULT_CANNY_HIGH_THRESHOLD, device: torch.device | str = "cpu"):
        if not 0 < low_threshold <= high_threshold < 1:
            raise InferenceError(f"the canny thresholds must satisfy 0 < low <= high < 1, got low {low_threshold} "
                                 f"and high {high_threshold} (--canny_low_threshold / --canny_high_threshold).")
        self.low_threshold, self.high_threshold = low_threshold, high_threshold
        self.device = torch.device(device)

    @torch.no_grad()
    def annotate(self, images: torch.Tensor) -> torch.Tensor:
        from reward_models.canny import binary_canny

        return binary_canny(images, self.low_threshold, self.high_threshold).repeat(1, 3, 1, 1)


def build_annotator(task: str, name_or_path: str | None = None, device: torch.device | str = "cpu",
                    canny_low_threshold: float = DEFAULT_CANNY_LOW_THRESHOLD, checkpoint: str | None = None,
                    canny_high_threshold: float = DEFAULT_CANNY_HIGH_THRESHOLD):
    """The reward model of `task`, used for its `annotate`, in float32.

    float32 whatever the generation dtype: the annotators are small next to SD1.5, and edge
    detectors lose edges in half precision. `checkpoint`: segmentation only, the weights of an
    mmseg config given as `name_or_path` (a folder with config.py and model.pth needs none).
    """
    from reward_models import DEFAULT_REWARD_MODEL_PATHS, build_reward_model

    if task == "canny":
        return CannyAnnotator(canny_low_threshold, canny_high_threshold, device)
    source = name_or_path if name_or_path is not None else DEFAULT_REWARD_MODEL_PATHS[task]
    try:
        return build_reward_model(task, name_or_path, checkpoint=checkpoint if task == "segmentation" else None,
                                  device=device, dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as error:  # missing file, no network, wrong file
        message = f"the {task} annotator weights ({source}) could not be loaded: {sentence(error)}"
        if "--reward_model_name_or_path" not in message:  # reward_models' own messages already advise
            message += (" Without network, download them elsewhere and pass the local path with "
                        "--reward_model_name_or_path.")
        raise InferenceError(message) from error


@torch.no_grad()
def extract_condition(annotator, image: Image.Image) -> Image.Image:
    """The ControlNet input for `image` (already at the generation size), as an RGB image."""
    condition = annotator.annotate(pil_to_tensor(image).to(annotator.device))
    return tensor_to_pil(condition)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def load_controlnet(path: str, dtype: torch.dtype):
    from diffusers import ControlNetModel

    return _load_from_hub_or_folder(lambda: ControlNetModel.from_pretrained(path, torch_dtype=dtype), path,
                                    "--controlnet_path")


class ModelCache:
    """Stable Diffusion loaded once; ControlNets and annotators loaded on first use per task.

    The demo switches task with each tab: the pipeline of a task is rebuilt from the shared SD
    components and that task's cached ControlNet, which costs nothing. At most
    `max_controlnets` ControlNets stay loaded (least recently used dropped) to bound GPU memory.
    """

    def __init__(self, sd_path: str, controlnet_paths: dict, annotator_paths: dict | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, max_controlnets: int = 2,
                 annotator_checkpoint: str | None = None):
        from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

        self.device = torch.device(device)
        self.dtype = dtype
        self.controlnet_paths = dict(controlnet_paths)
        self.annotator_paths = dict(annotator_paths or {})
        self.annotator_checkpoint = annotator_checkpoint
        self.max_controlnets = max_controlnets
        self.sd_path = resolve_sd_path(sd_path)
        # safety_checker=None as in the paper's evaluation and the original demo: the checker
        # blacks out images, which would corrupt metrics and the condition-consistency view.
        base = _load_from_hub_or_folder(
            lambda: StableDiffusionPipeline.from_pretrained(
                self.sd_path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False),
            self.sd_path, "--sd_path")
        base.to(self.device)
        # UniPC: the sampler of the paper's evaluation and validation (20 steps).
        self.scheduler_config = base.scheduler.config
        self.components = {name: getattr(base, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
        self._scheduler_class = UniPCMultistepScheduler
        self._controlnets: OrderedDict[str, object] = OrderedDict()
        self._annotators: dict[tuple, object] = {}
        self.resolved_controlnet_paths: dict[str, str] = {}
        # One generation at a time: the demo's tabs may fire concurrently and share the models.
        self.lock = threading.Lock()

    def controlnet_path(self, task: str) -> str:
        if task not in self.resolved_controlnet_paths:
            self.resolved_controlnet_paths[task] = resolve_controlnet_path(self.controlnet_paths.get(task), task)
        return self.resolved_controlnet_paths[task]

    def controlnet(self, task: str):
        path = self.controlnet_path(task)
        if path in self._controlnets:
            self._controlnets.move_to_end(path)
        else:
            while len(self._controlnets) >= self.max_controlnets:
                self._controlnets.popitem(last=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._controlnets[path] = load_controlnet(path, self.dtype).to(self.device).eval()
        return self._controlnets[path]

    def pipeline(self, task: str):
        """The SD1.5 + ControlNet pipeline of `task` (UniPC scheduler)."""
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline(
            **self.components,
            controlnet=self.controlnet(task),
            scheduler=self._scheduler_class.from_config(self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def annotator(self, task: str, canny_low_threshold: float = DEFAULT_CANNY_LOW_THRESHOLD,
                  canny_high_threshold: float = DEFAULT_CANNY_HIGH_THRESHOLD):
        key = (task, canny_low_threshold, canny_high_threshold) if task == "canny" else (task,)
        if key not in self._annotators:
            self._annotators[key] = build_annotator(
                task, self.annotator_paths.get(task), device=self.device,
                canny_low_threshold=canny_low_threshold, checkpoint=self.annotator_checkpoint,
                canny_high_threshold=canny_high_threshold)
        return self._annotators[key]


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
