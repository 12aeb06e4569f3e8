"""The interface every reward model implements, and the loading helpers they share.

A reward model (paper Sec. 3.2, "consistency feedback") is a frozen discriminative network
applied to the one-step image estimate; its per-sample loss against the input condition is the
reward loss. One object per task owns everything task-specific (STYLE.md rule 2), so the
training loop, the evaluation scripts and the inference helpers never branch on the task name.

Loading policy (what is trusted):
- Local files are read with ``torch.load(weights_only=True)``: plain tensors and containers
  only, no arbitrary code runs. mmengine checkpoints additionally allow-list the numpy
  globals their ``meta`` dict uses (see ``load_state_dict_file``); nothing else.
- mmengine checkpoints written by a training run also pickle logging objects (e.g.
  ``message_hub`` with ``HistoryBuffer``s, whose pickles call ``getattr``), which no allow-list
  can admit safely. For those (segmentation checkpoints only: plain state dicts such as HED's
  and line drawing's have no fallback), and only after the weights_only load refused them, a
  restricted unpickler reads the file: the same trusted globals (tensor rebuilding, numpy,
  OrderedDict) resolve to the real objects, every other global to an inert placeholder that
  runs nothing; BUILD (which sets state with ``setattr``) is refused on anything the file did
  not create itself (a class, function or module it imported), so a crafted file cannot patch
  e.g. ``collections.Counter.most_common`` for the rest of the process; only the
  ``state_dict`` tensors are kept.
- A URL is downloaded with ``torch.hub.download_url_to_file`` into a cache folder only when the
  file is not already cached there; without network the error names the file and the URL.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

# Where downloaded checkpoints are cached; overridable so that offline users can pre-seed it.
REWARD_MODEL_CACHE_ENV = "CONTROLNETPP_CACHE"


def default_cache_dir() -> Path:
    """``$CONTROLNETPP_CACHE`` or ``~/.cache/controlnet_pp/reward_models``."""
    root = os.environ.get(REWARD_MODEL_CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "controlnet_pp" / "reward_models"


def is_url(name_or_path: str) -> bool:
    return str(name_or_path).startswith(("http://", "https://"))


def resolve_checkpoint_file(name_or_path: str | os.PathLike, what: str, flag: str = "--reward_model_name_or_path") -> Path:
    """A local checkpoint path, or a URL downloaded once into the cache.

    ``what`` names the file in error messages (e.g. "HED checkpoint ControlNetHED.pth").
    """
    name_or_path = str(name_or_path)
    if not is_url(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} not found at {path}. Pass an existing file (or a URL) with {flag}."
            )
        return path
    url = name_or_path
    # Two files with the same name from different URLs would collide: key the cache by the URL path.
    cached = default_cache_dir() / url.split("://", 1)[1].split("?")[0].replace("/", "__")
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)
    except Exception as error:  # no network, HTTP error, proxy ...
        raise RuntimeError(
            f"Could not download the {what} from {url} ({type(error).__name__}: {error}). "
            f"Download it on a machine with network and pass the local path with {flag}, "
            f"or place it at {cached} (cache folder set by ${REWARD_MODEL_CACHE_ENV})."
        ) from error
    return cached


def _numpy_safe_globals() -> list:
    """The numpy objects mmengine's checkpoint ``meta`` pickles (arrays, dtypes, scalars).

    Checkpoints written under numpy 1.x name them ``numpy.core.multiarray.*``; numpy 2 moved
    them to ``numpy._core``. torch's allow-list matches on the pickled name, so both spellings
    are registered as ``(object, name)`` pairs. These reconstruct plain arrays and scalars only.
    """
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries: list = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
        entries.append((multiarray.scalar, f"{module}.scalar"))
    # numpy >= 1.25 pickles each dtype as its own class (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        entries += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return entries


class _InertObject:
    """Stands for any untrusted object of a checkpoint: accepts everything, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _InertObject()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _trusted_globals() -> dict[str, object]:
    """``module.name`` -> object: what torch's weights_only loader admits, plus the numpy entries."""
    import torch._utils

    try:  # torch's own allow-list (tensor and storage rebuilding, dtypes, _codecs.encode, ...)
        from torch._weights_only_unpickler import _get_allowed_globals

        trusted: dict[str, object] = dict(_get_allowed_globals())
    except ImportError:  # private API; the minimum a state dict needs
        import codecs

        trusted = {
            "_codecs.encode": codecs.encode,
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        }
    for entry in _numpy_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__name__}")
        trusted[name] = obj
    return trusted


_SHARED_KINDS = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
                 types.MethodDescriptorType, types.WrapperDescriptorType)


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves trusted globals only; every other global becomes ``_InertObject``.

    Pickles run code through the globals they import (``find_class``) and through BUILD, which
    calls ``setattr`` / ``__setstate__`` on the object below it on the stack. Replacing every
    untrusted global by an inert class removes the first; refusing BUILD on imported objects
    (classes, functions, modules: process-wide state) removes the second. The pure-Python
    unpickler is used because the C one cannot intercept BUILD; this path is the rare fallback.
    """

    trusted: dict[str, object] = {}

    def find_class(self, module: str, name: str):
        return self.trusted.get(f"{module}.{name}", _InertObject)

    def load_build(self):
        target = self.stack[-2]
        if isinstance(target, _SHARED_KINDS) or any(target is obj for obj in self.trusted.values()):
            raise pickle.UnpicklingError(
                f"refused: the file sets attributes of {getattr(target, '__qualname__', type(target).__name__)}, "
                "an object it did not create (a checkpoint may only set the state of its own objects).")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(path) -> object:
    _RestrictedUnpickler.trusted = _trusted_globals()
    restricted_pickle = types.SimpleNamespace(
        __name__="restricted_pickle",
        Unpickler=_RestrictedUnpickler,
        load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
    )
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=restricted_pickle)


def load_state_dict_file(path: str | os.PathLike, what: str, mmengine_checkpoint: bool = False
                         ) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (see the module docstring) and return its flat state dict.

    Accepts a plain state dict (HED, line drawing), or an mmengine checkpoint
    ``{'meta': ..., 'state_dict': ..., ...}`` (mmseg model zoo). A ``module.`` prefix left by
    DataParallel is stripped. mmengine's own ``load_checkpoint`` is not used: under torch>=2.6
    it loads with ``weights_only=True`` but without the numpy allow-list and fails.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        if not mmengine_checkpoint:  # a plain state dict holds nothing weights_only refuses
            reason = next((line.strip() for line in str(refused).splitlines() if "Unsupported global" in line),
                          str(refused).splitlines()[0] if str(refused) else "")
            raise RuntimeError(f"The {what} at {path} holds objects other than tensors, which torch.load("
                               f"weights_only=True) refused ({reason}); it is not a plain state dict. Pass the "
                               "published file, or re-save its tensors with torch.save(state_dict).") from refused
        # An object outside the allow-list (mmengine logging state, ...): read the file again
        # with every such object made inert, and keep nothing but the tensors.
        try:
            checkpoint = _restricted_load(path)
        except Exception as error:
            raise RuntimeError(f"Could not read the {what} at {path}: {error}") from refused
        if not isinstance(checkpoint, Mapping):
            raise RuntimeError(f"The {what} at {path} is not a dict of tensors: {refused}") from refused
    except Exception as error:
        raise RuntimeError(f"Could not read the {what} at {path} with torch.load(weights_only=True): {error}") from error
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise RuntimeError(
            f"The {what} at {path} is not a state dict of tensors (nor an mmengine checkpoint with a 'state_dict')."
        )
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_published_state_dict(name_or_path: str | os.PathLike, *, task: str, kind: str, what: str,
                              file_name: str, marker_key: str, url: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Resolve and read a published single-network checkpoint (HED, line drawing).

    ``marker_key`` is a key every such checkpoint has; without it the wrong file was given,
    which gets a message naming the file the task expects rather than a key mismatch.
    """
    path = resolve_checkpoint_file(name_or_path, f"{what} {file_name}")
    state_dict = load_state_dict_file(path, what)
    if marker_key not in state_dict:
        raise RuntimeError(
            f"{path} is not a {kind} checkpoint (no key {marker_key!r}). "
            f"The {task} task expects {file_name} from {url}."
        )
    return path, state_dict


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, path: Any) -> None:
    """``load_state_dict(strict=True)`` with an error that says which file does not fit."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"The {what} at {path} does not match the expected architecture "
            f"({type(module).__name__}); is it the right file for this task? Details: {error}"
        ) from error


def per_sample_mean(loss_map: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a (B, ...) loss map over all but the first dim, optionally over valid entries only.

    A sample with no valid entry gets 0, not NaN (e.g. a segmentation label that is all ignore).
    """
    loss_map = loss_map.float().flatten(1)
    if valid is None:
        return loss_map.mean(dim=1)
    valid = valid.flatten(1).to(loss_map.dtype)
    return (loss_map * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


class RewardModel(nn.Module):
    """Base class: a frozen reward model with its task-specific pre- and post-processing.

    Subclasses implement ``from_pretrained``, ``forward`` and ``extract_condition``; the
    defaults below cover the tasks whose target is the reward output of the real image (canny,
    hed, lineart). The class attributes say everything else the training, evaluation and
    inference code needs to know about a task, so that none of them branches on its name.
    """

    task: str = ""
    # The paper's model: the original release's --reward_model_name_or_path value.
    default_name_or_path: str = ""
    # Options of ``build`` this class accepts besides name_or_path, device and dtype
    # (config-based segmenters: an explicit checkpoint and the label format).
    build_options: tuple[str, ...] = ()
    has_weights: bool = True  # canny is a fixed filter
    # canny / hed / lineart derive their condition from the image on the fly; depth and
    # segmentation read it from a dataset column (control_depth, control_seg), named
    # ``default_condition_column`` in the paper's datasets.
    needs_condition_column: bool = False
    default_condition_column: str | None = None
    # The reward compares with a label map read from its own dataset column (segmentation:
    # ``label_from_image`` turns a label image into classes); training and evaluation need it.
    needs_label_column: bool = False
    # What evaluation compares with when no --label_column is given (depth: the raw
    # control_depth); None: the annotated input condition (edges) or a required column.
    evaluation_label_column: str | None = None
    # The condition is a palette of class colours: resized nearest, stored in colour. Otherwise
    # it is a grey map repeated x3 (edges, depth), stored with one channel.
    condition_is_palette: bool = False
    # ``annotate`` gives a binary map (canny's edges after hysteresis): scored by the F1 of its
    # edge pixels, MS-SSIM secondary (paper Table 1).
    binary_annotation: bool = False
    # The (low, high) hysteresis thresholds ``annotate`` takes as keywords (low_threshold,
    # high_threshold), which the demo and generate.py let users change; None: it takes none.
    annotation_thresholds: tuple[float, float] | None = None
    # The original's eval_edge.py read this task's stored maps through ``1 - x`` on uint8, which
    # wraps around (defect 2, line drawing): the paper protocol reproduces it.
    paper_protocol_wraps_inversion: bool = False
    metric_script: str = ""  # the eval/ script that scores the task (paper Table 1)
    title: str = ""  # the demo's tab title
    # The released ControlNet++ weights of the task: a subfolder of the paper's Hugging Face Space.
    released_controlnet_subfolder: str = ""

    @classmethod
    def build(cls, name_or_path: str | os.PathLike | None = None, checkpoint: str | None = None,
              label_format: str | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> "RewardModel":
        """The frozen model (eval, requires_grad False) from a ``name_or_path`` this class accepts;
        None is the paper's model. ``checkpoint`` / ``label_format`` are refused unless the class
        lists them in ``build_options``. ``dtype``: the weights' dtype (inputs of any float dtype
        are accepted; losses are float32)."""
        options = {"checkpoint": checkpoint, "label_format": label_format}
        if any(value is not None and name not in cls.build_options for name, value in options.items()):
            raise ValueError(f"checkpoint and label_format are for the segmentation task only, not {cls.task!r}.")
        model = cls.from_pretrained(cls.default_name_or_path if name_or_path is None else name_or_path,
                                    **{name: value for name, value in options.items() if name in cls.build_options})
        model = model.to(device=device if device is not None else "cpu")
        return model.to(dtype=dtype).freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "RewardModel":  # pragma: no cover - abstract
        """The model (not yet frozen) from a ``name_or_path`` the task accepts."""
        raise NotImplementedError

    @classmethod
    def benchmark_name(cls, dataset_name: str) -> str:
        """The paper's row a run of this task on ``dataset_name`` belongs to (Table 1)."""
        return cls.task

    @classmethod
    def evaluation_labels(cls, label_column: str | None, label_format: str | None,
                          annotator: str | None) -> tuple[str | None, str | None, str | None]:
        """eval.py's --label_column, --label_format and annotator, completed with the task's
        defaults; ValueError says which flag to pass or drop."""
        if label_format is not None:
            raise ValueError("--label_format is for --task_name segmentation only")
        return label_column or cls.evaluation_label_column, None, annotator

    def label_annotation(self, label_image, resolution: int) -> np.ndarray:
        """What evaluation compares with, from the dataset's label image: (resolution,
        resolution) uint8, as the original's eval.py stored it (tasks with a label column)."""
        raise TypeError(f"The {self.task!r} evaluation compares with the annotated condition, not a label column.")

    def freeze(self) -> "RewardModel":
        """Reward models are never trained: eval mode (BatchNorm statistics) and no grads."""
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "RewardModel":
        # The reward model stays in eval mode even when a parent module is put in train mode:
        # BatchNorm must use its running statistics, dropout must be off.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        for parameter in self.parameters():
            return parameter.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def target(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Reward output of the real image: ``batch["pixel_values"]`` is in [-1, 1]."""
        images = batch["pixel_values"].float() * 0.5 + 0.5  # x * std + mean, as the original denormalised
        return self(images.to(self.device)).detach()

    def pixel_loss(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Squared error per pixel (B, h, w), averaged over channels; every pixel is valid."""
        squared = (output.float() - target.float().to(output.device)) ** 2
        return squared.mean(dim=1), None

    def disagreement(self, output: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Per-pixel disagreement (B, h, w) of two outputs on ``pixel_loss``'s grid (Ctrl-U's U).

        Dense maps (edges, depth): absolute difference averaged over channels.
        """
        return (output.float() - other.float()).abs().mean(dim=1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,) float32: mean of ``pixel_loss`` over valid pixels, 0 if none."""
        loss_map, valid = self.pixel_loss(output, target)
        return per_sample_mean(loss_map, valid)

    def uncertainty_weighted_loss(self, output: torch.Tensor, output_later: torch.Tensor, target: torch.Tensor,
                                  scale: float = 1.0) -> tuple[torch.Tensor, float]:
        """Ctrl-U's per-sample reward (B,): mean over valid pixels of exp(-U) * loss + U, and mean U.

        U = scale * ``disagreement`` of the reward outputs for the images predicted from t and
        from t + k (KL of the class distributions for segmentation, absolute difference of the
        dense maps otherwise). Pixels where the reward model's reading is unstable (U large) are
        trusted less; the + U term keeps U from growing to silence the reward, and, since U is not
        detached, also asks the two predictions to agree.
        """
        loss_map, valid = self.pixel_loss(output, target)
        uncertainty = scale * self.disagreement(output, output_later)
        if uncertainty.shape != loss_map.shape:
            raise ValueError(f"{type(self).__name__}.disagreement gave {tuple(uncertainty.shape)}, "
                             f"pixel_loss {tuple(loss_map.shape)}: they must be on the same grid.")
        per_sample = per_sample_mean(torch.exp(-uncertainty) * loss_map + uncertainty, valid)
        return per_sample, per_sample_mean(uncertainty.detach(), valid).mean().item()

    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The ControlNet input (B, 3, H, W) computed from images in [0, 1], as in training."""
        raise NotImplementedError

    @torch.no_grad()
    def annotate(self, images: torch.Tensor) -> torch.Tensor:
        """The condition (B, 3, H, W) in [0, 1] as the original's evaluation and demo computed it
        from an image; the training input (``extract_condition``) unless a task differs (canny)."""
        return self.extract_condition(images)

    @torch.no_grad()
    def condition_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """``annotate`` as an 8-bit image (B, 3, H, W) uint8: the stored input condition / label of
        the evaluation. Rounded by default (exact for palettes and binary maps); the edge tasks
        truncate as the original's ``to_pil_image`` (``mul(255).byte()``) did."""
        return (self.annotate(images).float().clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def extracted_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The condition extracted from a *generated* image, stored as the original's evaluation
        stored it (B, 3, H, W) uint8, in the ControlNet input's format; ``condition_uint8`` unless
        the original stored generated maps differently (line drawing)."""
        return self.condition_uint8(images)

    def label_from_image(self, image) -> Any:
        raise TypeError(
            f"The {self.task!r} reward model takes no label column; label_from_image is for segmentation only."
        )

    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
