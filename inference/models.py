"""The models of a generation session: annotators (the reward models' `annotate`) and a cache that
loads Stable Diffusion once and each task's ControlNet and annotator on first use.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from PIL import Image

from inference.generation import InferenceError, pil_to_tensor, sentence, tensor_to_pil
from inference.paths import load_from_hub_or_folder, resolve_controlnet_path, resolve_sd_path
from reward_models import DEFAULT_REWARD_MODEL_PATHS, build_reward_model, reward_class


def build_annotator(task: str, name_or_path: str | None = None, device: torch.device | str = "cpu",
                    checkpoint: str | None = None):
    """The reward model of `task`, used for its `annotate`, in float32.

    float32 whatever the generation dtype: the annotators are small next to SD1.5, and edge
    detectors lose edges in half precision. `checkpoint`: the weights of an mmseg config given as
    `name_or_path` (a folder with config.py and model.pth needs none); annotators that take no
    checkpoint (every task but segmentation) ignore it, as the demo passes one for all tabs.
    """
    source = name_or_path if name_or_path is not None else DEFAULT_REWARD_MODEL_PATHS[task]
    if "checkpoint" not in reward_class(task).build_options:
        checkpoint = None
    try:
        return build_reward_model(task, name_or_path, checkpoint=checkpoint, device=device, dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as error:  # missing file, no network, wrong file
        message = f"the {task} annotator weights ({source}) could not be loaded: {sentence(error)}"
        if "--reward_model_name_or_path" not in message:  # reward_models' own messages already advise
            message += (" Without network, download them elsewhere and pass the local path with "
                        "--reward_model_name_or_path.")
        raise InferenceError(message) from error


@torch.no_grad()
def extract_condition(annotator, image: Image.Image, thresholds: tuple[float, float] | None = None) -> Image.Image:
    """The ControlNet input for `image` (already at the generation size), as an RGB image.

    `thresholds`: (low, high) for an annotator with hysteresis thresholds (canny: the demo's
    sliders, generate.py's --canny_low_threshold / --canny_high_threshold); the annotator's own
    defaults when None; other annotators take none and ignore them.
    """
    options = {}
    if annotator.annotation_thresholds is not None and thresholds is not None:
        low, high = thresholds
        if not 0 < low <= high < 1:
            flags = f"--{annotator.task}_low_threshold / --{annotator.task}_high_threshold"
            raise InferenceError(f"the {annotator.task} thresholds must satisfy 0 < low <= high < 1, got low {low} "
                                 f"and high {high} ({flags}).")
        options = {"low_threshold": low, "high_threshold": high}
    condition = annotator.annotate(pil_to_tensor(image).to(annotator.device), **options)
    return tensor_to_pil(condition)


def load_controlnet(path: str, dtype: torch.dtype):
    """The ControlNet of a checked folder or hub id (`resolve_controlnet_path`) in `dtype`."""
    from diffusers import ControlNetModel

    return load_from_hub_or_folder(lambda: ControlNetModel.from_pretrained(path, torch_dtype=dtype), path,
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
        base = load_from_hub_or_folder(
            lambda: StableDiffusionPipeline.from_pretrained(
                self.sd_path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False),
            self.sd_path, "--sd_path")
        base.to(self.device)
        # UniPC: the sampler of the paper's evaluation and validation (20 steps).
        self.scheduler_config = base.scheduler.config
        self.components = {name: getattr(base, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
        self._scheduler_class = UniPCMultistepScheduler
        self._controlnets: OrderedDict[str, object] = OrderedDict()
        self._annotators: dict[str, object] = {}
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

    def annotator(self, task: str):
        """The annotator (reward model) of `task`, built on first use."""
        if task not in self._annotators:
            self._annotators[task] = build_annotator(task, self.annotator_paths.get(task), device=self.device,
                                                     checkpoint=self.annotator_checkpoint)
        return self._annotators[task]
