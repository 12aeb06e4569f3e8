"""The toy world: tiny models and datasets with the real layouts, for tests and CPU smoke runs.

    python -m toy.world --out work_dirs/toy [--seed 0] [--rows N]

writes, deterministically from the seed (same seed -> the same bytes in every file), in about
10-30 s on two CPU cores (most of it imports and the reward models):

    toy-sd15/          a tiny Stable Diffusion in SD1.5's diffusers layout (real SD1.5 tokenizer
                       and scheduler config, tiny random UNet / VAE / text encoder)
    toy-controlnet/    ControlNetModel.from_unet(toy UNet), as a "pretrained" ControlNet
    datasets/<name>/   the six datasets of the paper, same columns and splits, saved with
                       `save_to_disk`: coloured circles, squares and triangles, with captions,
                       depth maps and segmentation maps that agree with the drawing
    clip/              tiny CLIPModel + CLIPProcessor for the CLIP-score metric
    fid/inception-toy.pt  TorchScript feature net with clean-fid's Inception calling convention
    reward_models/     tiny reward-model checkpoints (written by toy.reward_checkpoints)
    toy_world.json     manifest: generator version, seed, row counts, paths (relative to the
                       world's root) and every file with its size

Nothing is downloaded. Every model is random: the toy world checks that code runs, shapes and
dtypes agree, gradients flow and files are written, not that results are good.

Each scene is a pure function of (seed, dataset, split, row) (`toy_scene`), so tests can
recompute where each shape is and check the saved depth / segmentation maps against it.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generated content changes: a folder written by another version is rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "toy_world.json"
DEFAULT_TRAIN_ROWS = 200
DEFAULT_VALIDATION_ROWS = 64

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, key for key. SD1.5 ships a
# PNDMScheduler config; the toy names DDPMScheduler, the noise schedule training uses, and keeps
# PNDM's two extra keys so the values compared by tests are exactly SD1.5's.
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TEXT_HIDDEN_SIZE = 32


@dataclass(frozen=True)
class Architecture:
    """The toy Stable Diffusion's shape: VAE stages (and the ControlNet's condition encoder), UNet levels."""

    vae_factor: int  # 64 px images -> a (64 / vae_factor)^2 latent grid
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]


ARCHITECTURES = {
    # The tests' world: SD1.5's 8x VAE (8 x 8 latents at 64 px) and a 2-level UNet with SD1.5's
    # block structure (cross-attention at full latent resolution, plain ResNet blocks below).
    # Fast, but 8 x 8 latents cannot carry thin edges (docs/TOY_PRETRAIN.md: reconstructions cap
    # canny F1 at ~41).
    "f8": Architecture(8, (8, 16, 16, 32), (16, 32), ("CrossAttnDownBlock2D", "DownBlock2D"),
                       ("UpBlock2D", "CrossAttnUpBlock2D")),
    # The pretrained world's: a 4x VAE (16 x 16 latents, reconstruction ceiling ~62) and a
    # 3-level UNet, cross-attention at the two finer levels; ~3x the f8's cost per step.
    "f4": Architecture(4, (8, 16, 32), (16, 32, 64), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
DEFAULT_ARCHITECTURE = "f8"
VAE_SCALING_FACTOR = 0.18215  # SD1.5's latent scaling

# ---------------------------------------------------------------------------------------------
# Segmentation palettes and classes
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _mmseg_metainfo(module_file: str) -> dict:
    """``METAINFO`` of an mmseg dataset class, read from the installed mmseg source text.

    The source is parsed rather than imported: ``import mmseg.datasets`` needs mmcv's compiled
    ops and pulls in the whole mmseg registry, while the class list and palette are plain
    literals. The values are mmseg's own, so the toy maps use exactly the palette that the
    segmentation reward models and evaluation use.
    """
    spec = importlib.util.find_spec("mmseg")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mmsegmentation is not installed; its dataset palettes are needed "
                                  "to draw the toy segmentation datasets (pip install mmsegmentation).")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / module_file
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "METAINFO" for t in node.targets):
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
    raise ValueError(f"no METAINFO = dict(...) found in {path}; unsupported mmsegmentation version.")


def ade20k_palette() -> np.ndarray:
    """(151, 3) uint8: black for index 0 (background / other), then mmseg's 150 ADE20K colours."""
    palette = _mmseg_metainfo("ade.py")["palette"]
    return np.asarray([[0, 0, 0]] + list(palette), dtype=np.uint8)


def cocostuff_palette() -> np.ndarray:
    """(171, 3) uint8: mmseg's COCO-Stuff164k palette, indexed by class (255 = ignore -> black)."""
    return np.asarray(_mmseg_metainfo("coco_stuff.py")["palette"], dtype=np.uint8)


def ade20k_class_index(name: str) -> int:
    """seg_map value of an ADE20K class: 1 + its position in mmseg's 150 classes (0 = other)."""
    return 1 + [c.strip() for c in _mmseg_metainfo("ade.py")["classes"]].index(name)


def cocostuff_class_index(name: str) -> int:
    """panoptic_seg_map value of a COCO-Stuff164k class: its position in mmseg's 171 classes."""
    return list(_mmseg_metainfo("coco_stuff.py")["classes"]).index(name)


# What each drawn thing is called in the two label sets. Chosen among classes whose palette
# colour is unique, so palette images decode back to one class.
SHAPE_CLASSES = {  # shape -> (ADE20K class, COCO-Stuff class)
    "circle": ("ball", "sports ball"),
    "square": ("box", "tv"),
    "triangle": ("tent", "kite"),
}
REGION_CLASSES = {
    "wall": ("wall", "wall-other"),
    "floor": ("floor", "floor-other"),
    "sky": ("sky", "sky-other"),
    "grass": ("grass", "grass"),
}
COCO_IGNORE = 255

# ---------------------------------------------------------------------------------------------
# Scenes: pure functions of (seed, dataset, split, row)
# ---------------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "white": (245, 245, 245),
    "black": (20, 20, 20), "pink": (240, 130, 180), "cyan": (40, 200, 210),
}
REGION_COLOURS = {"wall": (150, 150, 150), "floor": (130, 90, 60), "sky": (120, 180, 240), "grass": (70, 150, 60)}
# (top region, bottom region or None for a plain background)
BACKGROUNDS = (("wall", "floor"), ("sky", "grass"), ("wall", None))

# MiDaS convention for the depth maps: brighter = nearer. Background regions stay below
# SHAPE_DEPTH_MIN so every shape is nearer than every background pixel.
REGION_DEPTH = {"sky": 0, "wall": 30}
GROUND_DEPTH = (40, 100)  # at the horizon, at the bottom edge: the ground comes towards the camera
SHAPE_DEPTH_MIN = 130

DATASETS = {  # name -> (splits, caption column, extra columns), as on the hub (limingcv/...)
    "MultiGen-20M_train": (("train",), "text", ()),
    "MultiGen-20M_canny_eval": (("validation",), "text", ()),
    "MultiGen-20M_depth": (("train",), "text", ("control_depth",)),
    "MultiGen-20M_depth_eval": (("validation",), "text", ("control_depth",)),
    "Captioned_ADE20K": (("train", "validation"), "prompt", ("control_seg", "seg_map")),
    "Captioned_COCOStuff": (("train", "validation"), "prompt", ("control_seg", "panoptic_seg_map")),
}
# COCO has several captions per image: its prompt column holds lists of strings, so data code
# meets both caption types (random choice in training, first at evaluation).
LIST_CAPTION_DATASETS = ("Captioned_COCOStuff",)


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    cx: int
    cy: int
    r: int  # half the extent: circle radius, half the square side, triangle half-base


@dataclass(frozen=True)
class ToyScene:
    width: int
    height: int
    mode: str  # PIL mode of the stored image: RGB, L or RGBA
    depth_mode: str  # PIL mode of the stored control_depth: RGB or L
    top: str  # background region names (REGION_COLOURS)
    bottom: str | None
    horizon: int  # first row of the bottom region (== height when plain)
    gradient: int  # brightness change from top to bottom of the background, in 0..255 units
    framed: bool  # a 3 px frame labelled ADE20K "other" (0) and COCO-Stuff ignore (255)
    shapes: tuple[Shape, ...]  # in drawing order: later shapes are nearer
    captions: tuple[str, ...]


def _row_rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    dataset_id = list(DATASETS).index(dataset)
    split_id = ("train", "validation").index(split)
    return np.random.default_rng([seed, dataset_id, split_id, index])


def _place_shapes(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int, int]]:
    """Centres and sizes such that no shape covers another's centre (tests probe centres)."""
    placed: list[tuple[int, int, int]] = []
    side = min(width, height)
    for _ in range(50 * count):
        if len(placed) == count:
            break
        # Big enough that Canny edges and segmentation survive a 64 px resize.
        r = int(rng.integers(int(0.16 * side), int(0.26 * side) + 1))
        cx = int(rng.integers(r, width - r))
        cy = int(rng.integers(r, height - r))
        if all(np.hypot(cx - x, cy - y) > 1.5 * max(r, q) for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


def _captions(shapes: tuple[Shape, ...], top: str, bottom: str | None) -> tuple[str, ...]:
    names = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in shapes]
    if len(shapes) == 1:
        main = names[0]
    else:
        main = f"{names[0]} {_relation(shapes[0], shapes[1])} {names[1]}"
        if len(shapes) == 3:
            main += f" and {names[2]}"
    setting = f"{top} and {bottom}" if bottom else f"plain {top}"
    return (f"{main}, in front of a {setting}",
            f"{', '.join(names)} drawn over a {top}",
            f"a simple picture with {len(shapes)} coloured shape{'s' if len(shapes) > 1 else ''}")


def toy_scene(seed: int, dataset: str, split: str, index: int) -> ToyScene:
    """The scene of one dataset row; pure function of its arguments."""
    rng = _row_rng(seed, dataset, split, index)
    # Sides 64..128 px, one row in four square: the real preprocessing (resize + crop) must
    # handle both.
    width = int(rng.integers(64, 129))
    height = width if index % 4 == 0 else int(rng.integers(64, 129))
    top, bottom = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    horizon = int(rng.integers(height * 2 // 5, height * 3 // 5)) if bottom else height
    placed = _place_shapes(rng, width, height, int(rng.integers(1, 4)))
    colour_names = list(COLOURS)
    shapes = tuple(
        Shape(kind=str(rng.choice(list(SHAPE_CLASSES))), colour=colour_names[int(rng.integers(len(colour_names)))],
              cx=cx, cy=cy, r=r)
        for cx, cy, r in placed
    )
    return ToyScene(
        width=width, height=height,
        # Some grayscale and some RGBA images: real datasets have both and the loaders must
        # convert them.
        mode="L" if index % 8 == 3 else "RGBA" if index % 8 == 6 else "RGB",
        depth_mode="L" if index % 8 == 5 else "RGB",
        top=top, bottom=bottom, horizon=horizon,
        gradient=int(rng.integers(0, 2)) * int(rng.integers(-40, 41)),
        framed=index % 5 == 2,
        shapes=shapes,
        captions=_captions(shapes, top, bottom),
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill, outline=None) -> None:
    cx, cy, r = shape.cx, shape.cy, shape.r
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
    elif shape.kind == "square":
        h = int(round(0.85 * r))
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill, outline=outline)
    else:  # triangle pointing up; its centre (cx, cy) lies inside
        points = [(cx, cy - r), (cx + r, cy + int(0.7 * r)), (cx - r, cy + int(0.7 * r))]
        draw.polygon(points, fill=fill, outline=outline)


def render_scene(scene: ToyScene) -> dict[str, np.ndarray]:
    """Draw a scene: image (H,W,3) uint8, depth (H,W) uint8, ADE20K seg (H,W), COCO-Stuff seg (H,W).

    All four are drawn from the same shapes in the same order, without anti-aliasing, so
    labels agree with the image pixel for pixel.
    """
    w, h = scene.width, scene.height
    rows = np.arange(h)[:, None]
    image = np.zeros((h, w, 3), np.float32)
    depth = np.zeros((h, w), np.float32)
    ade = np.zeros((h, w), np.uint8)
    coco = np.zeros((h, w), np.uint8)
    regions = [(scene.top, rows < scene.horizon)]
    if scene.bottom:
        regions.append((scene.bottom, rows >= scene.horizon))
    for region, mask in regions:
        mask = np.broadcast_to(mask, (h, w))
        image[mask] = REGION_COLOURS[region]
        ade_name, coco_name = REGION_CLASSES[region]
        ade[mask] = ade20k_class_index(ade_name)
        coco[mask] = cocostuff_class_index(coco_name)
        if region in REGION_DEPTH:
            depth[mask] = REGION_DEPTH[region]
        else:
            near = (rows - scene.horizon) / max(h - 1 - scene.horizon, 1)
            ramp = np.broadcast_to(GROUND_DEPTH[0] + near * (GROUND_DEPTH[1] - GROUND_DEPTH[0]), (h, w))
            depth[mask] = ramp[mask]
    image += (rows / max(h - 1, 1) * scene.gradient)[:, :, None]
    image = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    depth_img, ade_img, coco_img = (Image.fromarray(a.round().astype(np.uint8)) for a in (depth, ade, coco))
    draws = [ImageDraw.Draw(im) for im in (image, depth_img, ade_img, coco_img)]
    step = (255 - SHAPE_DEPTH_MIN) / len(scene.shapes)
    for k, shape in enumerate(scene.shapes):
        ade_name, coco_name = SHAPE_CLASSES[shape.kind]
        _draw_shape(draws[0], shape, COLOURS[shape.colour])
        _draw_shape(draws[1], shape, int(round(SHAPE_DEPTH_MIN + step * (k + 1))))  # later = nearer
        _draw_shape(draws[2], shape, ade20k_class_index(ade_name))
        # COCO-Stuff leaves object outlines unlabelled: ignore (255) pixels on every shape boundary.
        _draw_shape(draws[3], shape, cocostuff_class_index(coco_name), outline=COCO_IGNORE)
    if scene.framed:  # a dark picture frame, unlabelled in both label sets
        box = (0, 0, w - 1, h - 1)
        draws[0].rectangle(box, outline=(40, 30, 20), width=3)
        draws[2].rectangle(box, outline=0, width=3)
        draws[3].rectangle(box, outline=COCO_IGNORE, width=3)
    return {"image": np.asarray(image), "depth": np.asarray(depth_img), "ade20k": np.asarray(ade_img),
            "cocostuff": np.asarray(coco_img)}


def _png(array: np.ndarray, mode: str | None = None) -> dict:
    """An ``Image()`` feature value: PNG bytes (never JPEG: its artefacts corrupt label maps)."""
    image = Image.fromarray(array)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def dataset_row(seed: int, dataset: str, split: str, index: int) -> dict:
    """One dataset row with the columns the real dataset has."""
    _, caption_column, extra = DATASETS[dataset]
    scene = toy_scene(seed, dataset, split, index)
    drawn = render_scene(scene)
    if dataset in LIST_CAPTION_DATASETS:
        caption = list(scene.captions[: 1 + index % 3])
    else:
        caption = scene.captions[0]
    row = {"image": _png(drawn["image"], scene.mode), caption_column: caption}
    if "control_depth" in extra:
        row["control_depth"] = _png(np.repeat(drawn["depth"][:, :, None], 3, axis=2), scene.depth_mode)
    if "seg_map" in extra:
        row["control_seg"] = _png(ade20k_palette()[drawn["ade20k"]])
        row["seg_map"] = _png(drawn["ade20k"])
    if "panoptic_seg_map" in extra:
        palette = np.concatenate([cocostuff_palette(), np.zeros((256 - 171, 3), np.uint8)])  # 255 -> black
        row["control_seg"] = _png(palette[drawn["cocostuff"]])
        row["panoptic_seg_map"] = _png(drawn["cocostuff"])
    return row


def _write_datasets(root: Path, seed: int, rows: dict[str, int]) -> None:
    import datasets

    for name, (splits, caption_column, extra) in DATASETS.items():
        features = {"image": datasets.Image()}
        if name in LIST_CAPTION_DATASETS:
            features[caption_column] = datasets.Sequence(datasets.Value("string"))
        else:
            features[caption_column] = datasets.Value("string")
        for column in extra:
            features[column] = datasets.Image()
        features = datasets.Features(features)
        parts = {}
        for split in splits:
            table = [dataset_row(seed, name, split, i) for i in range(rows[split])]
            columns = {key: [row[key] for row in table] for key in features}
            ds = datasets.Dataset.from_dict(columns, features=features, split=split)
            # from_dict gives a random fingerprint, and save_to_disk writes it to state.json;
            # a fingerprint derived from the content keeps the folder byte-identical per seed.
            fingerprint = hashlib.sha256(f"toy-{GENERATOR_VERSION}-{seed}-{name}-{split}-{rows[split]}".encode()).hexdigest()[:16]
            parts[split] = datasets.Dataset(ds.data, info=ds.info, split=ds.split, fingerprint=fingerprint)
        # A progress bar per split would drown the one line this generator prints.
        bars_were_disabled = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()
        try:
            datasets.DatasetDict(parts).save_to_disk(str(root / "datasets" / name))
        finally:
            if not bars_were_disabled:
                datasets.utils.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _component_seed(seed: int, component: str) -> int:
    """Independent torch seed per component, so adding one model never changes the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{component}".encode()).digest()[:4], "little")


@contextmanager
def _seeded(seed: int, component: str):
    """torch's global RNG seeded for ``component`` inside the block, the caller's state restored after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, component))
        yield


def _text_config():
    """Tiny CLIP text transformer on SD1.5's real vocabulary and 77 positions."""
    from transformers import CLIPTextConfig

    from utils.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, VOCAB_SIZE, clip_vocab_and_merges

    vocab, _ = clip_vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH, hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        hidden_act="quick_gelu",  # CLIP's activation
        # The real ids (SD1.5's config still says 0/2, a leftover that transformers special-cases).
        bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
    )


def _write_sd15(root: Path, seed: int, architecture: str = DEFAULT_ARCHITECTURE) -> None:
    """toy-sd15/ in the layout of runwayml/stable-diffusion-v1-5, and toy-controlnet/."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from utils.tokenizer import write_clip_tokenizer

    sd = root / "toy-sd15"
    design = ARCHITECTURES[architecture]
    with _seeded(seed, "unet"):
        unet = UNet2DConditionModel(
            sample_size=64 // design.vae_factor, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=design.unet_channels, down_block_types=design.unet_down_blocks,
            up_block_types=design.unet_up_blocks, cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=4, norm_num_groups=8,
        )
    with _seeded(seed, "vae"):
        # len(vae_channels) blocks = len - 1 2x downsamplings; 4 latent channels, as SD's.
        blocks = len(design.vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            block_out_channels=design.vae_channels, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            scaling_factor=VAE_SCALING_FACTOR,
        )
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(_text_config())
    unet.save_pretrained(sd / "unet")
    vae.save_pretrained(sd / "vae")
    text_encoder.save_pretrained(sd / "text_encoder")
    write_clip_tokenizer(sd / "tokenizer")
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    _write_json(sd / "scheduler" / "scheduler_config.json", {"_class_name": "DDPMScheduler", **SD15_SCHEDULER_CONFIG})
    _write_json(sd / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })

    with _seeded(seed, "controlnet"):
        controlnet = toy_controlnet_from_unet(unet, vae)
    controlnet.save_pretrained(root / "toy-controlnet")


def toy_controlnet_from_unet(unet, vae):
    """ControlNetModel.from_unet, initialised like a released (trained) ControlNet.

    Draws from torch's global RNG: callers seed it. The condition encoder has the VAE's stages
    (SD1.5's ControlNet: four stages, three stride-2 convolutions for its 8x VAE), so the
    condition image (full resolution) reaches the latent grid. A released ControlNet has been trained: its zero convolutions are no
    longer zero and its condition encoder produces features on the scale of the latent
    features. A freshly initialised toy would ignore its condition and, at the first step,
    give gradient to the zero convolutions only. So: He initialisation for the condition
    encoder (ReLU-like SiLU stack, keeps unit scale) and PyTorch's default for the zero
    convolutions; then the condition changes the output and every weight trains from step one.
    """
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(vae.config.block_out_channels))
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
    for conv in [controlnet.controlnet_mid_block, *controlnet.controlnet_down_blocks]:
        conv.reset_parameters()
    return controlnet


def _write_clip(root: Path, seed: int) -> None:
    """clip/: tiny CLIPModel + CLIPProcessor (the SD1.5 tokenizer, 32 px images) for CLIP-score."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from utils.tokenizer import write_clip_tokenizer

    out = root / "clip"
    config = CLIPConfig(
        text_config=_text_config().to_dict(),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"),
        projection_dim=32,
    )
    with _seeded(seed, "clip"):
        model = CLIPModel(config)
    model.save_pretrained(out)
    tokenizer_dir = out / "_tokenizer_source"
    write_clip_tokenizer(tokenizer_dir)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
    )
    shutil.rmtree(tokenizer_dir)
    processor.save_pretrained(out)


@lru_cache(maxsize=1)
def _toy_inception_class():
    """The TorchScript-able toy Inception class, created once per process.

    Byte-identical TorchScript files need care: TorchScript renames ("mangles") a class compiled
    a second time in one process, and serialises nn.Conv2d's constants in set order, which varies
    between processes. So the class is created once, and the network uses only aten operators
    (torch.conv2d, torch.relu, upsample_bilinear2d) instead of nn.Conv2d / F.interpolate.
    """
    import torch
    from torch import nn

    class ToyInceptionLayers(nn.Module):
        """Three stride-2 3x3 convolutions + ReLU, global average pooling: (B,3,H,W) -> (B,64,1,1)."""

        def __init__(self):
            super().__init__()
            widths = (3, 16, 32, 64)
            self.weight1 = nn.Parameter(torch.randn(widths[1], widths[0], 3, 3) / (widths[0] * 9) ** 0.5)
            self.weight2 = nn.Parameter(torch.randn(widths[2], widths[1], 3, 3) / (widths[1] * 9) ** 0.5)
            self.weight3 = nn.Parameter(torch.randn(widths[3], widths[2], 3, 3) / (widths[2] * 9) ** 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(torch.conv2d(x, self.weight1, None, 2))
            x = torch.relu(torch.conv2d(x, self.weight2, None, 2))
            x = torch.relu(torch.conv2d(x, self.weight3, None, 2))
            return x.mean(dim=(2, 3), keepdim=True)

    class ToyInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = ToyInceptionLayers()

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            # inception-2015-12-05.pt resizes its 0..255 input to 299 px itself.
            x = torch._C._nn.upsample_bilinear2d(x, [299, 299], False, None)
            return self.layers((x - 128.0) / 128.0).flatten(1)

    return ToyInception


def _write_inception(root: Path, seed: int) -> None:
    """fid/inception-toy.pt: TorchScript stand-in for clean-fid's inception-2015-12-05.pt.

    Same calling convention: ``forward(x, return_features=...)`` takes float (B,3,H,W) images in
    0..255 of any size and resizes them to 299 itself; the submodule ``layers`` takes 299 px
    images normalised to [-1, 1] by (x - 128) / 128 (clean-fid's "clean" mode). ``forward``
    returns features (B, 64), ``layers`` (B, 64, 1, 1), so clean-fid's ``.view((B, D))`` works.
    """
    import torch

    with _seeded(seed, "inception"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated": clean-fid's format needs it
        module = torch.jit.script(_toy_inception_class()().eval())
    (root / "fid").mkdir(parents=True, exist_ok=True)
    module.save(str(root / "fid" / "inception-toy.pt"))


def _write_reward_models(root: Path, seed: int) -> dict[str, str]:
    """Tiny reward-model checkpoints in the published formats (toy.reward_checkpoints owns them)."""
    import torch

    from toy.reward_checkpoints import write_toy_reward_models

    with torch.random.fork_rng(devices=[]):  # whatever it seeds, the caller's RNG state survives
        written = write_toy_reward_models(out_dir=root / "reward_models", seed=seed)
    return {name: Path(path).resolve().relative_to(root.resolve()).as_posix() for name, path in written.items()}


def refuse_foreign_folder(out: Path) -> None:
    """Raise if ``out`` holds files but no toy-world manifest: what is there is not ours to replace."""
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out} exists, is not empty and holds no {MANIFEST_NAME}: refusing to replace a "
                              "folder that is not a toy world. Pass an empty or new --out folder.")


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target``: an existing one is moved aside, then deleted,
    so ``target`` is never a half-written folder."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(new, target)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# The whole world
# ---------------------------------------------------------------------------------------------


def _rows_per_split(rows: int | None) -> dict[str, int]:
    if rows is None:
        return {"train": DEFAULT_TRAIN_ROWS, "validation": DEFAULT_VALIDATION_ROWS}
    if rows < 1:
        raise ValueError(f"--rows must be >= 1 (rows per split), got {rows}.")
    return {"train": rows, "validation": rows}


def missing_reward_models(manifest: dict) -> list[str]:
    """The reward-model keys this code writes that a world's manifest lacks (a world made before they existed)."""
    from toy.reward_checkpoints import REWARD_MODEL_KEYS

    present = manifest.get("paths", {}).get("reward_models", {})
    return [key for key in REWARD_MODEL_KEYS if key not in present]


def _is_complete(root: Path, seed: int, rows: dict[str, int], architecture: str = DEFAULT_ARCHITECTURE) -> dict | None:
    """The manifest of ``root`` if it holds a complete world for this seed, rows, architecture and version."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if (manifest.get("generator_version"), manifest.get("seed"), manifest.get("rows")) != (GENERATOR_VERSION, seed, rows):
        return None
    if manifest.get("architecture", DEFAULT_ARCHITECTURE) != architecture:
        return None
    if missing_reward_models(manifest):
        return None  # written before a model was added (the evaluation segmenters): made again
    for rel, size in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


def _absolute(manifest: dict, root: Path) -> dict:
    """The manifest as returned to callers: ``paths`` entries made absolute."""
    resolved = dict(manifest)
    resolved["root"] = str(root.resolve())

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return str((root / value).resolve())

    resolved["paths"] = walk(manifest["paths"])
    return resolved


def make_toy_world(out: str | os.PathLike, seed: int = 0, rows: int | None = None,
                   architecture: str = DEFAULT_ARCHITECTURE) -> dict:
    """Write the toy world to ``out`` (see the module docstring) and return its manifest.

    ``rows``: rows per split (default 200 train / 64 validation); ``architecture``: a key of
    ARCHITECTURES. If ``out`` already holds a complete world for the same seed, rows,
    architecture and generator version, it is returned untouched.
    The world is built in a temporary sibling folder and renamed at the end, so an interrupted
    run never leaves a partial folder that looks complete. The returned manifest's ``paths``
    are absolute; the file on disk keeps them relative to the world's root.
    """
    out = Path(out)
    split_rows = _rows_per_split(rows)
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}.")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}.")
    manifest = _is_complete(out, seed, split_rows, architecture)
    if manifest is not None:
        return _absolute(manifest, out)
    refuse_foreign_folder(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        _write_sd15(tmp, seed, architecture)
        _write_clip(tmp, seed)
        _write_inception(tmp, seed)
        _write_datasets(tmp, seed, split_rows)
        reward_paths = _write_reward_models(tmp, seed)
        paths = {
            "sd15": "toy-sd15",
            "controlnet": "toy-controlnet",
            "clip": "clip",
            "inception": "fid/inception-toy.pt",
            "datasets": {name: f"datasets/{name}" for name in DATASETS},
            "reward_models": reward_paths,
        }
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "rows": split_rows,
                    "paths": paths, "files": files}
        if architecture != DEFAULT_ARCHITECTURE:  # the f8 world's manifest keeps its earlier bytes
            manifest["architecture"] = architecture
        _write_json(tmp / MANIFEST_NAME, manifest)
        if _is_complete(out, seed, split_rows, architecture) is not None:
            # A concurrent run renamed the same world into place meanwhile: keep that one.
            return _absolute(manifest, out)
        if out.exists():
            # Another seed / version / an incomplete world: move it aside, then delete it.
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            # A concurrent run renamed its complete world into place between the two steps.
            if _is_complete(out, seed, split_rows, architecture) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _absolute(manifest, out)


# ---------------------------------------------------------------------------------------------
# Reading a toy world's model paths (inference's --toy)
# ---------------------------------------------------------------------------------------------

# The annotator of each task among the manifest's reward models. The toy world ships an ADE20K
# and a COCO-Stuff segmenter; the demo's segmentation ControlNet (like the released one) is the
# ADE20K model. canny has no weights.
TOY_ANNOTATORS = {"hed": "hed", "lineart": "lineart", "depth": "depth", "segmentation": "segmentation_ade20k"}


@dataclass(frozen=True)
class ToyWorld:
    """The model paths of a toy world, read from its toy_world.json."""

    root: Path
    sd_path: str
    controlnet_path: str
    annotators: dict  # task -> path of its annotator weights

    def annotator_path(self, task: str) -> str | None:
        """The toy annotator of `task` (None for a task whose reward model has no weights: canny).

        A toy world without it fails here rather than falling back to the paper's weights, which
        would be a download in the middle of a toy run.
        """
        from reward_models import reward_class

        if not reward_class(task).has_weights:
            return None
        if task not in self.annotators:
            raise FileNotFoundError(f"the toy world {self.root} has no {task} annotator (written by an older "
                                    "toy/world.py?); delete the folder and run again to rewrite it.")
        return self.annotators[task]


def read_toy_world(folder: str | os.PathLike) -> ToyWorld:
    """The toy world in `folder`, read from its manifest; written there first (seed 0) if it has none."""
    root = Path(folder).expanduser()
    if (root / MANIFEST_NAME).is_file():
        # Read, not re-made: make_toy_world would replace a world written with another seed.
        paths = _absolute(json.loads((root / MANIFEST_NAME).read_text()), root)["paths"]
    else:
        print(f"no toy world at {root}: writing one (seed 0, a few seconds)")
        paths = make_toy_world(root, seed=0)["paths"]
    reward_models = paths.get("reward_models", {})
    return ToyWorld(root.resolve(), paths["sd15"], paths["controlnet"],
                    {task: reward_models[key] for task, key in TOY_ANNOTATORS.items() if key in reward_models})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m toy.world")
    parser.add_argument("--out", required=True, help="folder to write the toy world to (e.g. work_dirs/toy)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> the same bytes in every file")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows per dataset split (default {DEFAULT_TRAIN_ROWS} train / "
                             f"{DEFAULT_VALIDATION_ROWS} validation)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="f8: SD1.5's 8x VAE, 8 x 8 latents (fast; the tests' world); f4: a 4x VAE and a "
                             "3-level UNet, 16 x 16 latents (the pretrained world's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = make_toy_world(Path(args.out), seed=args.seed, rows=args.rows, architecture=args.architecture)
    print(f"toy world (seed {manifest['seed']}, rows {manifest['rows']}) at {manifest['root']}: "
          f"{len(manifest['files'])} files, {time.perf_counter() - start:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
