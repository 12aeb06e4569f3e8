"""Semantic segmentation through mmseg: the reward model of the segmentation task and the
segmenter of the mIoU evaluation.

The paper rewards ADE20K with UperNet-R50 and COCO-Stuff with DeepLabV3-R50-d8, and evaluates
with Mask2Former Swin-L (ADE20K) and DeepLabV3-R101-d8 (COCO-Stuff); any mmseg config works.

``name_or_path`` is one of
- ``mmseg::<algo>/<config>.py``: a config shipped with the installed mmseg (the original
  release's values); the checkpoint defaults to the model-zoo URL from the config's metafile;
- a config file path, with ``checkpoint`` a local path or URL;
- a folder holding ``config.py`` and one checkpoint (``model.pth`` or a single ``*.pth``).
``checkpoint="random"`` builds the config with random weights and loads nothing (tests).

Loading (what is trusted): the checkpoint is read with ``torch.load(weights_only=True)`` and
only numpy arrays/scalars allow-listed for mmengine's ``meta``; training-state objects
(``message_hub``) are read inert by base's restricted unpickler, never executed (see
``base.load_state_dict_file``). The config, though, is Python that mmengine executes: every
default is an ``mmseg::`` config of the installed package; a config file or a folder's
``config.py`` is run only when passed explicitly (a warning names it). The weights load with ``load_state_dict(strict=True)``. mmengine's ``load_checkpoint`` is not used: it
fails on these checkpoints under torch>=2.6. Backbone ``init_cfg``/``pretrained`` entries are
dropped, so building never downloads ImageNet weights.

The training loss is a cross-entropy on the decode head's own output grid (1/4 or 1/8 of the
input), with the label resized to it by nearest neighbour, as in the original release: no
upsampling of logits in the reward step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .base import RewardModel, load_state_dict_file, load_state_dict_strict, resolve_checkpoint_file
from .palettes import ADE20K_PALETTE, COCO_STUFF_PALETTE, IGNORE_INDEX, ade20k_palette_to_label

LABEL_FORMATS = ("ade20k_palette", "index", "index_reduce_zero")
# Dataset class of the config -> how that dataset's label images are written.
LABEL_FORMAT_BY_DATASET = {"ADE20KDataset": "ade20k_palette", "COCOStuffDataset": "index"}
RANDOM_WEIGHTS = "random"
# How each label column of the paper's evaluation datasets is written: Captioned_ADE20K's seg_map
# holds 1 + class (0 = other, mmseg's reduce_zero_label), control_seg the ADE20K palette,
# COCO-Stuff's panoptic_seg_map the class index with 255 = ignore.
LABEL_FORMAT_BY_COLUMN = {"seg_map": "index_reduce_zero", "control_seg": "ade20k_palette", "panoptic_seg_map": "index"}
# The evaluation's annotator (condition extractor of the generated images) defaults to the
# paper's reward model of the dataset: UperNet-R50 for ADE20K, DeepLabV3-R50 for COCO-Stuff.
EVALUATION_ANNOTATORS = {
    "index": "mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-160k_coco-stuff164k-512x512.py",
    "index_reduce_zero": "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py",
    "ade20k_palette": "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py",
}
# mmseg's SegDataPreProcessor default for every ImageNet-pretrained config (0..255 scale, RGB).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def mmseg_config_dir() -> Path:
    """The configs shipped inside the installed mmseg package (``mmseg/.mim/configs``)."""
    import importlib.util

    spec = importlib.util.find_spec("mmseg")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mmseg is not installed; the segmentation reward model needs mmsegmentation>=1.0.")
    return Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs"


def model_zoo_url(config_path: Path) -> str:
    """The ``Weights`` URL of ``config_path`` in the metafile.yaml next to it."""
    import yaml

    metafile = config_path.parent / "metafile.yaml"
    if metafile.is_file():
        for entry in yaml.safe_load(metafile.read_text()).get("Models", []):
            if Path(entry.get("Config", "")).name == config_path.name and entry.get("Weights"):
                return entry["Weights"]
    raise FileNotFoundError(
        f"No model-zoo checkpoint is listed for {config_path.name} in {metafile}; pass one with --reward_model_checkpoint."
    )


def resolve_segmentation_files(name_or_path: str, checkpoint: str | None) -> tuple[Path, str | None]:
    """(config file, checkpoint path/URL or None for random weights)."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith("mmseg::"):
        config = mmseg_config_dir() / name_or_path.removeprefix("mmseg::")
        if not config.is_file():
            raise FileNotFoundError(
                f"{name_or_path} is not a config of the installed mmseg (looked for {config}). "
                "Check the name against mmseg's configs folder, e.g. mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py."
            )
        if checkpoint is None:
            checkpoint = model_zoo_url(config)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            config = path / "config.py"
            if not config.is_file():
                raise FileNotFoundError(f"segmentation folder {path} has no config.py; it must hold config.py and model.pth.")
            if checkpoint is None:
                candidates = [path / "model.pth"] if (path / "model.pth").is_file() else sorted(path.glob("*.pth"))
                if len(candidates) != 1:
                    raise FileNotFoundError(
                        f"segmentation folder {path} must hold model.pth or exactly one *.pth checkpoint "
                        f"(found {[c.name for c in candidates]}); or pass --reward_model_checkpoint."
                    )
                checkpoint = str(candidates[0])
        elif path.is_file():
            config = path
            if checkpoint is None:
                raise ValueError(
                    f"config {path} needs a checkpoint: pass it with --reward_model_checkpoint "
                    f"(a path or URL; '{RANDOM_WEIGHTS}' for random weights)."
                )
        else:
            raise FileNotFoundError(
                f"segmentation reward model {name_or_path!r} is neither an mmseg:: config name, a config file "
                "nor a folder with config.py + model.pth (--reward_model_name_or_path)."
            )
    return config, (None if checkpoint == RANDOM_WEIGHTS else checkpoint)


def _drop_pretrained_init(model_cfg) -> None:
    """Remove ImageNet ``pretrained``/``init_cfg`` entries: weights come from the checkpoint."""
    if isinstance(model_cfg, Mapping):
        for key in ("pretrained", "init_cfg"):
            if key in model_cfg:
                model_cfg[key] = None
        for value in model_cfg.values():
            _drop_pretrained_init(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            _drop_pretrained_init(value)


def _dataset_type(cfg) -> str | None:
    if cfg.get("dataset_type"):
        return cfg.dataset_type
    for loader in ("train_dataloader", "test_dataloader", "val_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        if dataset.get("type"):
            return dataset["type"]
    return None


def _test_resize_scale(cfg) -> tuple[int, int] | None:
    """``scale`` of the keep-ratio Resize in the config's test pipeline (mmseg's eval protocol)."""
    for step in cfg.get("test_pipeline") or []:
        if step.get("type") in ("Resize", "mmseg.Resize") and step.get("keep_ratio", False) and step.get("scale"):
            return tuple(step["scale"])
    return None


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: fit the long/short edges into max(scale)/min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def require_mmcv_ops() -> None:
    """mmseg's models need mmcv's compiled ops, which `scripts/setup.sh --without-segmentation` skips."""
    try:
        import mmcv.ops  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "segmentation (ADE20K / COCO-Stuff rewards and evaluation) needs mmcv 2.1.0 with its compiled ops, "
            f"which this environment lacks ({error}). Run `bash scripts/setup.sh` once: it builds mmcv "
            "(about 15 minutes on 2 cores) and caches the wheel.") from error


class SegmentationRewardModel(RewardModel):
    """Logits (B, C, h, w) on the decode head's grid; reward CE over valid pixels per sample."""

    task = "segmentation"
    default_name_or_path = "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py"
    build_options = ("checkpoint", "label_format")
    needs_condition_column = True  # the condition is the dataset's control_seg palette image
    default_condition_column = "control_seg"
    needs_label_column = True
    condition_is_palette = True
    metric_script = "eval/eval_seg.py"
    title = "Segmentation (ADE20K)"  # the released segmentation ControlNet++ is the ADE20K one
    released_controlnet_subfolder = "checkpoints/seg/controlnet"

    def __init__(self, segmentor: torch.nn.Module, cfg, label_format: str):
        super().__init__()
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r} (--label_format).")
        self.segmentor = segmentor
        self.label_format = label_format
        self.num_classes = int(segmentor.decode_head.num_classes)
        preprocessor = cfg.model.get("data_preprocessor") or {}
        self.register_buffer("mean", torch.tensor(preprocessor.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessor.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        self.test_resize_scale = _test_resize_scale(cfg)
        self.test_pipeline = [dict(step) for step in (cfg.get("test_pipeline") or [])]
        # Mask2Former / MaskFormer heads predict (class, mask) pairs per query, not per-pixel logits.
        self.is_mask_classification = hasattr(segmentor.decode_head, "num_queries")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, checkpoint: str | None = None, label_format: str | None = None
    ) -> "SegmentationRewardModel":
        require_mmcv_ops()
        from mmengine.config import Config
        from mmengine.model import revert_sync_batchnorm
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        config_path, checkpoint = resolve_segmentation_files(name_or_path, checkpoint)
        if not str(name_or_path).startswith("mmseg::"):
            # mmengine configs are Python: reading one runs it. Only the user's own flag gets here
            # (every default is an mmseg:: config of the installed package), and it is said aloud.
            logging.getLogger(__name__).warning(
                f"Running {config_path}: mmengine configs are Python code, executed when loaded. Load only "
                "segmentation folders and configs you trust.")
        cfg = Config.fromfile(str(config_path))
        if label_format is None:
            dataset_type = _dataset_type(cfg)
            if dataset_type not in LABEL_FORMAT_BY_DATASET:
                raise ValueError(
                    f"cannot infer the label format of dataset {dataset_type!r} in {config_path}; "
                    f"pass --label_format (one of {LABEL_FORMATS})."
                )
            label_format = LABEL_FORMAT_BY_DATASET[dataset_type]
        _drop_pretrained_init(cfg.model)
        register_all_modules(init_default_scope=True)
        # SyncBN needs a process group; the reward model is frozen in eval mode, where plain BN is identical.
        segmentor = revert_sync_batchnorm(MODELS.build(cfg.model))
        if checkpoint is not None:
            path = resolve_checkpoint_file(checkpoint, f"segmentation checkpoint for {config_path.name}",
                                           flag="--reward_model_checkpoint")
            state_dict = load_state_dict_file(path, "segmentation checkpoint", mmengine_checkpoint=True)
            load_state_dict_strict(segmentor, state_dict, "segmentation checkpoint", path)
        return cls(segmentor, cfg, label_format)

    @classmethod
    def benchmark_name(cls, dataset_name: str) -> str:
        """ade20k or cocostuff (the paper's two segmentation rows), else the dataset folder's name."""
        dataset = str(dataset_name).lower()
        if "ade" in dataset:
            return "ade20k"
        if "coco" in dataset:
            return "cocostuff"
        return Path(str(dataset_name)).name

    @classmethod
    def evaluation_labels(cls, label_column: str | None, label_format: str | None,
                          annotator: str | None) -> tuple[str | None, str | None, str | None]:
        """A label column is required; its format defaults from its name, the annotator from the format."""
        if label_column is None:
            raise ValueError("segmentation needs --label_column: seg_map for ADE20K, panoptic_seg_map for COCO-Stuff")
        if label_format is None:
            if label_column not in LABEL_FORMAT_BY_COLUMN:
                raise ValueError(f"cannot tell how --label_column {label_column} is written; pass --label_format")
            label_format = LABEL_FORMAT_BY_COLUMN[label_column]
        return label_column, label_format, annotator or EVALUATION_ANNOTATORS[label_format]

    def label_annotation(self, label_image, resolution: int) -> np.ndarray:
        """Class indices (255 = ignore) of the label image, resized nearest (no blended classes)."""
        from PIL import Image

        label = label_image_to_index(label_image, self.label_format)
        return np.asarray(Image.fromarray(label.astype(np.uint8)).resize((resolution, resolution), Image.NEAREST))

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        # mmseg's data_preprocessor works on 0..255 RGB (bgr_to_rgb flips the BGR loader's output).
        return ((images.float() * 255.0 - self.mean.float()) / self.std.float()).to(self.dtype)

    def _batch_metas(self, height: int, width: int, batch_size: int) -> list[dict]:
        shape = (height, width)
        return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape) for _ in range(batch_size)]

    def _mask_classification_scores(self, features, height: int, width: int, batch_size: int) -> torch.Tensor:
        """Per-class scores (B, C, h, w) of a mask-classification head, last decoder layer."""
        from mmseg.structures import SegDataSample

        samples = [SegDataSample(metainfo=meta) for meta in self._batch_metas(height, width, batch_size)]
        all_class_logits, all_mask_logits = self.segmentor.decode_head(features, samples)
        class_probs = F.softmax(all_class_logits[-1].float(), dim=-1)[..., :-1]  # drop the "no object" class
        return torch.einsum("bqc,bqhw->bchw", class_probs, all_mask_logits[-1].float().sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits on the decode head's grid, (B, num_classes, h, w), differentiable."""
        self._check_images(images)
        x = self._normalize(images)
        features = self.segmentor.extract_feat(x)
        if self.is_mask_classification:
            # Mask2Former has no per-pixel logits; the log of its semantic scores plays their role.
            scores = self._mask_classification_scores(features, *images.shape[-2:], images.shape[0])
            return scores.clamp_min(1e-6).log()
        logits = self.segmentor.decode_head(features)
        if isinstance(logits, (list, tuple)):  # e.g. K-Net returns one map per stage; the last is final
            logits = logits[-1]
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64 class map at the input size, mmseg's whole-image inference.

        As mmseg's test pipeline, the image is first resized with the config's keep-ratio test
        scale (e.g. 512 -> 640 for the Mask2Former 640x640 config), the logits are resized back.
        """
        self._check_images(images)
        height, width = images.shape[-2:]
        x = images
        if self.test_resize_scale is not None:
            size = keep_ratio_size(height, width, self.test_resize_scale)
            if size != (height, width):
                x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        x = self._normalize(x)
        metas = self._batch_metas(*x.shape[-2:], x.shape[0])
        logits = self.segmentor.encode_decode(x, metas)
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)

    @torch.no_grad()
    def predict_mmseg(self, images_uint8: np.ndarray, test_scale: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) int64 class maps of RGB uint8 images (B, H, W, 3) through mmseg's own test path,
        as ``mim test mmseg`` ran it in the original's evaluation: the config's test pipeline (image
        loaded as an array instead of a file, no annotations), the model's data preprocessor and
        ``test_step`` (padding, whole / slide inference, logits resized back, argmax).

        ``test_scale`` replaces the scale of the pipeline's keep-ratio ``Resize`` (one is added when
        the pipeline has none): the paper protocol's (2048, 512), which the original's test
        dataloaders used for every evaluation segmenter. None keeps the config's own.
        """
        from mmcv.transforms import Compose
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        steps = [dict(step) for step in self.test_pipeline if step.get("type") not in ("LoadAnnotations",
                                                                                        "mmseg.LoadAnnotations")]
        if not steps or "Load" not in str(steps[0].get("type")):
            steps.insert(0, dict(type="LoadImageFromFile"))
        steps[0] = dict(type="LoadImageFromNDArray")
        if test_scale is not None:
            resized = [i for i, step in enumerate(steps) if step.get("type") in ("Resize", "mmseg.Resize")]
            if resized:
                for i in resized:
                    steps[i] = dict(type="Resize", scale=tuple(test_scale), keep_ratio=True)
            else:
                steps.insert(1, dict(type="Resize", scale=tuple(test_scale), keep_ratio=True))
        if not any("Pack" in str(step.get("type")) for step in steps):
            steps.append(dict(type="PackSegInputs"))
        pipeline = Compose(steps)
        data = {"inputs": [], "data_samples": []}
        for image in images_uint8:
            # mmseg loads files as BGR and its data preprocessor flips them back (bgr_to_rgb).
            packed = pipeline(dict(img=np.ascontiguousarray(image[..., ::-1])))
            data["inputs"].append(packed["inputs"])
            data["data_samples"].append(packed["data_samples"])
        results = self.segmentor.test_step(data)
        return torch.stack([result.pred_sem_seg.data[0].long().cpu() for result in results])

    @torch.no_grad()
    def target(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise KeyError(
                "the segmentation reward needs batch['labels']; pass --label_column "
                "(control_seg for ADE20K, panoptic_seg_map for COCO-Stuff)."
            )
        return batch["labels"].long().to(self.device)

    def disagreement(self, output: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """KL(p || q) per pixel (B, h, w) of the class distributions of two logit maps (Ctrl-U)."""
        log_p, log_q = F.log_softmax(output.float(), dim=1), F.log_softmax(other.float(), dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)

    def pixel_loss(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (B, h, w) on the logits' grid; the label is resized to it (nearest)."""
        labels = target.to(output.device)
        if labels.shape[-2:] != output.shape[-2:]:
            labels = F.interpolate(labels[:, None].float(), size=output.shape[-2:], mode="nearest")[:, 0].long()
        valid = labels != IGNORE_INDEX
        if (labels[valid] >= output.shape[1]).any() or (labels[valid] < 0).any():
            raise ValueError(
                f"segmentation labels must be in [0, {output.shape[1]}) or {IGNORE_INDEX}; got values up to "
                f"{int(labels[valid].max())}. Is --label_format right for this dataset ({self.label_format})?"
            )
        loss_map = F.cross_entropy(output.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return loss_map, valid

    def label_from_image(self, image) -> np.ndarray:
        """A dataset label image (PIL or array) -> (H, W) int64, 255 = ignore."""
        return label_image_to_index(image, self.label_format)

    @property
    def palette(self) -> tuple:
        if self.label_format == "ade20k_palette" or self.num_classes == len(ADE20K_PALETTE):
            return ADE20K_PALETTE
        if self.num_classes == len(COCO_STUFF_PALETTE):
            return COCO_STUFF_PALETTE
        raise NotImplementedError(
            f"no palette known for a {self.num_classes}-class segmenter; extract_condition paints ADE20K (150) "
            "and COCO-Stuff (171) classes only."
        )

    @torch.no_grad()
    def extract_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Palette image (B, 3, H, W) in [0, 1] of the predicted classes, as control_seg."""
        palette = torch.tensor(self.palette, dtype=torch.float32, device=images.device) / 255.0
        classes = self.predict(images)
        return palette[classes.clamp(0, len(palette) - 1)].permute(0, 3, 1, 2).contiguous()


def label_image_to_index(image, label_format: str) -> np.ndarray:
    """CPU label mapping, usable without building a model (the data pipeline uses it)."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r} (--label_format).")
    if label_format == "ade20k_palette":
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        return ade20k_palette_to_label(array)
    array = np.asarray(image)
    if array.ndim == 3:
        # A grey label saved as RGB has equal channels; anything else is not an index image.
        if not (array[..., :1] == array).all():
            raise ValueError(
                f"label_format {label_format!r} expects a single-channel index image, got a colour image; "
                "use --label_format ade20k_palette for palette images."
            )
        array = array[..., 0]
    labels = array.astype(np.int64)
    if label_format == "index_reduce_zero":
        # mmseg's reduce_zero_label: 0 (unlabelled) -> 255, every other class shifts down by one.
        labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
        labels[array == IGNORE_INDEX] = IGNORE_INDEX
    return labels
