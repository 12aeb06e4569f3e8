"""Pretrain the toy world on its own datasets, so that its images are scenes, not noise.

    python -m toy.world --out work_dirs/toy                      # the random toy world (seconds)
    python -m toy.pretrain --toy work_dirs/toy --out work_dirs/toy-pretrained \
        [--seed 0] [--budget small|full] [--grid docs/img/toy_pretrain.png]

`toy/world.py` writes tiny *random* models: enough to check that code runs, useless to check
that a method works. This command trains them, on the CPU and deterministically from
``--seed``, on the toy world's train splits, and writes a complete toy world in exactly the
same layout (every path that works under ``work_dirs/toy`` works under the pretrained world):

    toy-sd15/vae         AutoencoderKL: L1 reconstruction + small KL; scaling_factor recomputed
                         as 1 / std of the latents, as Stable Diffusion did; 2 GroupNorm groups
                         instead of 8 (VAE_NORM_GROUPS says why), same weights' shapes
    toy-sd15/unet        text-to-image, epsilon prediction, SD1.5's DDPM schedule, 64 px
    toy-sd15/text_encoder  trained with the UNet (SD1.5 kept CLIP's frozen; the toy's random
                         encoder gave every caption nearly the same features, so shapes and
                         colours followed the caption only softly: docs/TOY_PRETRAIN.md)
    reward_models/       HED (soft shape boundaries), line drawing (thin outlines, 1 = paper),
                         DPT depth (control_depth; dpt-large, the evaluation's, wider), mmseg
                         ADE20K and COCO-Stuff segmenters (UperNet, the rewards; DeepLabV3+, the
                         evaluation's *_seg_eval)
    toy-controlnet/      ControlNetModel.from_unet(pretrained UNet), initialised as toy/world.py
                         does; per-task ControlNets are trained later by train/train_controlnet.py
    everything else      (tokenizer, text encoder, scheduler, datasets, clip/, fid/) copied as is

``toy_world.json`` keeps toy/world.py's keys and adds a ``pretrained`` section: budget, seed and,
per model, steps, batch size, learning rate and the first / final training loss.

Budgets (measured times and losses in docs/TOY_PRETRAIN.md): ``small`` takes about a minute
on a 24-row toy world (tests); ``full`` about an hour on one free core of the 200-row f4 world. Same seed, same thread count -> the
same bytes in every file (one thread by default: CPU reductions may be ordered differently with
another thread count, and on a shared machine one thread is also the fastest).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.data import ControlNetRows, collate_rows, load_dataset_any
from toy.world import DATASETS, MANIFEST_NAME, refuse_foreign_folder, replace_folder

RESOLUTION = 64  # the toy world's training resolution (8 x 8 latents with the f8 VAE, 16 x 16 with f4)


@dataclass(frozen=True)
class Stage:
    """How long one model trains: optimizer steps, batch size, peak learning rate (AdamW)."""

    steps: int
    batch_size: int
    lr: float


# The learning rates are large by diffusion standards: the models are tiny and train from
# scratch for a few hundred steps (AdamW with a short warm-up and cosine decay, clip norm 1).
BUDGETS: dict[str, dict[str, Stage]] = {
    # For tests: enough steps for every loss to fall clearly, on a 24-row world, in ~1 minute.
    "small": {
        "vae": Stage(steps=40, batch_size=8, lr=2e-3),
        "unet": Stage(steps=60, batch_size=16, lr=2e-3),
        "hed": Stage(steps=40, batch_size=8, lr=3e-3),
        "lineart": Stage(steps=30, batch_size=8, lr=3e-3),
        "depth": Stage(steps=30, batch_size=8, lr=2e-3),
        "segmentation_ade20k": Stage(steps=60, batch_size=8, lr=3e-3),
        "segmentation_cocostuff": Stage(steps=60, batch_size=8, lr=3e-3),
        "segmentation_ade20k_eval": Stage(steps=60, batch_size=8, lr=3e-3),
        "segmentation_cocostuff_eval": Stage(steps=60, batch_size=8, lr=3e-3),
        "depth_eval": Stage(steps=30, batch_size=8, lr=2e-3),
    },
    # The pretrained world: soft scenes that follow the caption (docs/TOY_PRETRAIN.md, "Before / after").
    "full": {
        "vae": Stage(steps=1500, batch_size=16, lr=2e-3),
        "unet": Stage(steps=5000, batch_size=32, lr=1e-3),
        "hed": Stage(steps=300, batch_size=16, lr=2e-3),
        "lineart": Stage(steps=300, batch_size=16, lr=2e-3),
        "depth": Stage(steps=250, batch_size=16, lr=1e-3),
        "segmentation_ade20k": Stage(steps=300, batch_size=16, lr=2e-3),
        "segmentation_cocostuff": Stage(steps=300, batch_size=16, lr=2e-3),
        # The evaluation segmenters (another architecture, twice as wide) train on every scale up
        # to the paper protocol's (SEGMENTER_AUGMENTATION), 5x as long as the rewarding ones.
        "segmentation_ade20k_eval": Stage(steps=1500, batch_size=16, lr=2e-3),
        "segmentation_cocostuff_eval": Stage(steps=1500, batch_size=16, lr=2e-3),
        # The evaluation depth model (a wider, deeper DPT) trains 4x as long as the reward's.
        "depth_eval": Stage(steps=1000, batch_size=16, lr=1e-3),
    },
}
# Weight of the KL term against the per-pixel L1 of the VAE: small, as in SD's autoencoder
# (kl_weight 1e-6 on a summed KL), so latents stay close to N(0, 1) without blurring.
VAE_KL_WEIGHT = 1e-6
# GroupNorm groups of the toy VAE. toy/world.py's 8 groups on its 8 full-resolution channels
# normalise every channel on its own, which erases each channel's mean, i.e. the colour of flat
# regions; with 2 groups the L1 after 300 steps was 0.149 instead of 0.205 (docs/TOY_PRETRAIN.md).
# Only the config changes: GroupNorm's weights are per channel, so the toy's weights still load.
VAE_NORM_GROUPS = 2
# Captions dropped to "" for classifier-free guidance (the pipeline's default guidance is 7.5).
UNET_CAPTION_DROPOUT = 0.1
# The final loss is the mean over the last part of the run: one batch is too noisy to compare.
FINAL_LOSS_FRACTION = 0.1
IMAGE_DATASETS = ("MultiGen-20M_train", "MultiGen-20M_depth", "Captioned_ADE20K", "Captioned_COCOStuff")


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def component_seed(seed: int, component: str) -> int:
    """Independent seed per model, so changing one model's budget never changes another's."""
    return int.from_bytes(hashlib.sha256(f"toy-pretrain/{seed}/{component}".encode()).digest()[:4], "little")


@contextmanager
def deterministic(seed: int, component: str, threads: int):
    """Global torch RNG seeded for ``component``, deterministic kernels, a fixed thread count.

    Everything is restored afterwards, so importing and calling this from a test leaves the
    caller's state alone.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(component_seed(seed, component))
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


# ---------------------------------------------------------------------------------------------
# Data: each dataset decoded once, at 64 px, through the training code's own transforms
# ---------------------------------------------------------------------------------------------


def load_rows(toy: Path, dataset: str, tokenizer, conditioning_image_column=None, label_column=None,
              label_from_image=None) -> dict[str, torch.Tensor]:
    """All train rows of a toy dataset as one collated batch (resize + centre crop to 64 px).

    ``ControlNetRows`` in eval mode is exactly the data path of training and evaluation; the
    rows are decoded once because the toy datasets are small and PNG decoding would otherwise
    dominate the run.
    """
    _, caption_column, _ = DATASETS[dataset]
    rows = ControlNetRows(
        load_dataset_any(str(toy / "datasets" / dataset), "train"), tokenizer, RESOLUTION,
        image_column="image", caption_column=caption_column, conditioning_image_column=conditioning_image_column,
        label_column=label_column, label_from_image=label_from_image, train=False, dataset_name=dataset,
    )
    return collate_rows([rows[i] for i in range(len(rows))])


def label_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class map -> (B, 1, H, W) float, 1 on both sides of every change of class.

    The toy images are flat regions and shapes drawn without anti-aliasing, so the places where
    the segmentation changes are exactly the edges and outlines a detector should find.
    """
    labels = labels[:, None].float()
    edges = torch.zeros_like(labels, dtype=torch.bool)
    horizontal = labels[..., :, 1:] != labels[..., :, :-1]
    vertical = labels[..., 1:, :] != labels[..., :-1, :]
    edges[..., :, 1:] |= horizontal
    edges[..., :, :-1] |= horizontal
    edges[..., 1:, :] |= vertical
    edges[..., :-1, :] |= vertical
    return edges.float()


def soft_edges(edges: torch.Tensor) -> torch.Tensor:
    """HED-like target: the boundaries widened to ~4 px and smoothed, in [0, 1].

    HED's maps are thick and soft (it averages five side outputs down to 1/16 resolution); the
    line drawing's target is the thin boundary itself.
    """
    thick = F.max_pool2d(edges, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(thick, kernel_size=3, stride=1, padding=1, count_include_pad=False)


# ---------------------------------------------------------------------------------------------
# One training loop for every model
# ---------------------------------------------------------------------------------------------


def fit(name: str, module: torch.nn.Module, loss_of_batch, num_rows: int, stage: Stage, seed: int,
        log_every: int = 50) -> dict:
    """Train ``module`` with AdamW on ``loss_of_batch(row_indices, generator) -> scalar``.

    Batches are drawn with replacement from ``num_rows`` rows by a generator seeded per model;
    the same generator draws the model's noise (VAE samples, diffusion noise and timesteps).
    Returns the record written to the manifest: steps, batch size, lr, first and final loss.
    """
    generator = torch.Generator().manual_seed(component_seed(seed, f"{name}/data"))
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=stage.lr, weight_decay=1e-2)
    warmup = max(1, stage.steps // 20)
    # Linear warm-up (Adam's first steps are large), then cosine decay to 10% of the peak.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * min(step, stage.steps) / stage.steps)))
    losses = []
    start = time.perf_counter()
    for step in range(stage.steps):
        rows = torch.randint(num_rows, (stage.batch_size,), generator=generator)
        loss = loss_of_batch(rows, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            print(f"  {name} step {step + 1}/{stage.steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    tail = max(1, int(round(FINAL_LOSS_FRACTION * stage.steps)))
    return {**asdict(stage), "first_loss": losses[0], "final_loss": float(np.mean(losses[-tail:])),
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Stable Diffusion parts
# ---------------------------------------------------------------------------------------------


def load_diffusers_model(model_class, folder: Path, **config_overrides):
    """``from_pretrained`` without the ``_name_or_path`` it records in the config.

    That key would write the (temporary) folder loaded from into the saved config.json, and
    two runs with the same seed would no longer give the same bytes.
    """
    from diffusers.configuration_utils import FrozenDict

    model = model_class.from_pretrained(folder, **config_overrides)
    model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k != "_name_or_path"})
    return model


def train_vae(vae, images: torch.Tensor, stage: Stage, seed: int) -> dict:
    """Reconstruction L1 + small KL on images in [-1, 1]; then scaling_factor = 1 / std(latents)."""
    vae.train()

    def loss_of_batch(rows, generator):
        x = images[rows]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
        return (reconstruction - x).abs().mean() + VAE_KL_WEIGHT * kl

    record = fit("vae", vae, loss_of_batch, len(images), stage, seed)
    vae.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(component_seed(seed, "vae/scaling"))
        latents = torch.cat([vae.encode(images[i : i + 64]).latent_dist.sample(generator) for i in range(0, len(images), 64)])
    # Stable Diffusion set 0.18215 = 1 / std of its autoencoder's latents, so that the
    # diffusion model sees unit-variance inputs; the toy autoencoder gets its own value.
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    with torch.no_grad():
        reconstruction = torch.cat([vae(images[i : i + 64], sample_posterior=False).sample for i in range(0, len(images), 64)])
    record["scaling_factor"] = vae.config.scaling_factor
    record["reconstruction_l1_0_255"] = float((reconstruction.clamp(-1, 1) - images).abs().mean() * 127.5)
    return record


def train_unet(unet, vae, text_encoder, scheduler, images: torch.Tensor, input_ids: torch.Tensor,
               empty_ids: torch.Tensor, stage: Stage, seed: int) -> dict:
    """Epsilon prediction on the frozen VAE's latents; the text encoder trains with the UNet."""
    with torch.no_grad():
        # The frozen VAE runs once: the latent distribution of every image.
        moments = [vae.encode(images[i : i + 64]).latent_dist for i in range(0, len(images), 64)]
        latent_mean = torch.cat([m.mean for m in moments])
        latent_std = torch.cat([m.std for m in moments])
    scaling_factor = vae.config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    models.train()

    def loss_of_batch(rows, generator):
        latents = (latent_mean[rows] + latent_std[rows] * torch.randn(latent_mean[rows].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(len(alphas_cumprod), (len(rows),), generator=generator)
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # DDPMScheduler.add_noise
        drop = torch.rand(len(rows), generator=generator) < UNET_CAPTION_DROPOUT
        ids = torch.where(drop.view(-1, 1), empty_ids, input_ids[rows])
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        return F.mse_loss(prediction, noise)

    record = fit("unet", models, loss_of_batch, len(images), stage, seed, log_every=100)
    models.eval()
    return record


def toy_controlnet_from_unet(unet, vae, seed: int):
    """The toy ControlNet of the pretrained UNet, initialised as toy/world.py does (seeded here)."""
    from toy.world import toy_controlnet_from_unet as controlnet_like_a_release

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, "controlnet"))
        return controlnet_like_a_release(unet, vae)


# ---------------------------------------------------------------------------------------------
# Reward models: each trained through its own RewardModel wrapper, saved in its published format
# ---------------------------------------------------------------------------------------------


def train_edge_detector(name: str, reward_model, network, images01, target, stage: Stage, seed: int) -> dict:
    """HED / line drawing: binary cross-entropy of the [0, 1] map against a [0, 1] target.

    Cross-entropy rather than the reward's MSE: edges cover a few percent of the pixels and
    MSE's gradient vanishes on a saturated sigmoid.
    """
    network.train()  # RewardModel.train() keeps the wrapper in eval mode; the network itself trains

    def loss_of_batch(rows, generator):
        output = reward_model(images01[rows]).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(output, target[rows])

    record = fit(name, network, loss_of_batch, len(images01), stage, seed)
    network.eval()
    return record


def train_with_reward_loss(name: str, reward_model, network, images01, targets, stage: Stage, seed: int,
                           augment=None) -> dict:
    """Depth / segmentation: the reward model's own per-sample loss (what the reward measures).
    ``augment(images01, targets, generator) -> (images01, targets)`` transforms each batch."""
    network.train()

    def loss_of_batch(rows, generator):
        images, batch_targets = images01[rows], targets[rows]
        if augment is not None:
            images, batch_targets = augment(images, batch_targets, generator)
        return reward_model.loss(reward_model(images), batch_targets).mean()

    record = fit(name, network, loss_of_batch, len(images01), stage, seed)
    network.eval()
    return record


def save_state_dict(network: torch.nn.Module, path: Path) -> None:
    """Plain state dict, the format of ControlNetHED.pth and the line-drawing model.pth."""
    torch.save({key: value.contiguous() for key, value in network.state_dict().items()}, path)


def save_mmseg_checkpoint(reward_model, path: Path, seed: int) -> None:
    """mmengine's layout ({'meta', 'state_dict'}) with numpy objects in meta, as the model zoo."""
    from reward_models.palettes import ADE20K_PALETTE, COCO_STUFF_PALETTE

    palette = ADE20K_PALETTE if reward_model.num_classes == len(ADE20K_PALETTE) else COCO_STUFF_PALETTE
    checkpoint = {
        "meta": {
            "mmseg_version": "toy-pretrained",
            "seed": np.int64(seed),
            "dataset_meta": {"classes": tuple(f"class{i}" for i in range(reward_model.num_classes)),
                             "palette": np.array(palette, dtype=np.uint8)},
        },
        "state_dict": {key: value.contiguous() for key, value in reward_model.segmentor.state_dict().items()},
    }
    torch.save(checkpoint, path)


def pretrain_reward_models(toy: Path, out: Path, paths: dict[str, str], tokenizer, budget: dict[str, Stage],
                           seed: int, threads: int) -> dict:
    """Train the learned reward models of the toy world (and its evaluation segmenters) in place of
    their random weights."""
    from reward_models.depth import DepthRewardModel
    from reward_models.hed import HEDRewardModel
    from reward_models.lineart import LineArtRewardModel
    from reward_models.segmentation import label_image_to_index

    records = {}
    # Edges: from the ADE20K train split, whose labels give every region and shape boundary.
    ade = load_rows(toy, "Captioned_ADE20K", tokenizer, label_column="control_seg",
                    label_from_image=lambda image: label_image_to_index(image, "ade20k_palette"))
    ade_images01 = (ade["pixel_values"] + 1) / 2
    edges = label_boundaries(ade["labels"])

    with deterministic(seed, "hed", threads):
        hed = HEDRewardModel.from_pretrained(out / paths["hed"])
        # The learned mean starts at the data's mean colour (0..255) rather than 0: the input
        # of the first convolution is then centred, as the published network's is.
        hed.network.norm.data.copy_(ade_images01.mean(dim=(0, 2, 3)).view(1, 3, 1, 1) * 255)
        records["hed"] = train_edge_detector("hed", hed, hed.network, ade_images01, soft_edges(edges), budget["hed"], seed)
        save_state_dict(hed.network, out / paths["hed"])

    with deterministic(seed, "lineart", threads):
        lineart = LineArtRewardModel.from_pretrained(out / paths["lineart"])
        records["lineart"] = train_edge_detector("lineart", lineart, lineart.network, ade_images01, 1 - edges,
                                                 budget["lineart"], seed)
        save_state_dict(lineart.network, out / paths["lineart"])

    # The reward's DPT, then the evaluation's (the paper scores depth with DPT-Large, not with the
    # DPT-Hybrid it rewards with): the same rows and loss, each its own initialisation and batches.
    depth_rows = load_rows(toy, "MultiGen-20M_depth", tokenizer, conditioning_image_column="control_depth")
    for key in ("depth", "depth_eval"):
        with deterministic(seed, key, threads):
            depth = DepthRewardModel.from_pretrained(out / paths[key])
            records[key] = train_with_reward_loss(key, depth, depth.dpt, (depth_rows["pixel_values"] + 1) / 2,
                                                  depth.target(depth_rows), budget[key], seed)
            # save_pretrained rewrites config + weights; preprocessor_config.json (input size) stays.
            depth.dpt.save_pretrained(str(out / paths[key]), safe_serialization=True)

    for key in SEGMENTERS:
        records[key] = pretrain_segmenter(toy, out / paths[key], key, tokenizer, budget[key], seed, threads)
    return records


# The segmenters of the toy world: (dataset, label column); the reward's and the evaluation's
# train on the same rows, each from its own random initialisation and with its own batches.
SEGMENTERS = {
    "segmentation_ade20k": ("Captioned_ADE20K", "control_seg"),
    "segmentation_cocostuff": ("Captioned_COCOStuff", "panoptic_seg_map"),
    "segmentation_ade20k_eval": ("Captioned_ADE20K", "control_seg"),
    "segmentation_cocostuff_eval": ("Captioned_COCOStuff", "panoptic_seg_map"),
}


@dataclass(frozen=True)
class ScaleCrop:
    """Scale augmentation of a segmenter's training batches: each batch is upsampled (bilinear, as
    mmcv resizes test images; labels nearest) by one factor drawn log-uniformly in
    [1, max_scale], then every image is cropped at its own random place to at most ``crop`` px
    (mmseg's RandomResize + RandomCrop, in the spirit of its ADE20K recipes)."""

    max_scale: float
    crop: int


# The evaluation segmenters are scored under the paper protocol, which resizes every image to a
# short side of 512 (eval/eval_seg.py, PAPER_TEST_SCALE) before segmenting: the toy's 64 px
# images arrive upsampled 8x. Trained at 64 px only, a segmenter meets there a scale it never
# saw (the real ones are trained at the scale they are tested at), and the oracle, the real
# images themselves, scored 33.8 / 25.5 mIoU at 512 px against 62.4 / 68.6 at 64 px. So they
# train on every scale from 1x (the corrected scoring's 64 px) to 8x (the paper protocol's).
# The rewarding segmenters see the 64 px training images as they are and are not augmented.
SEGMENTER_AUGMENTATION = {
    "segmentation_ade20k_eval": ScaleCrop(max_scale=8.0, crop=128),
    "segmentation_cocostuff_eval": ScaleCrop(max_scale=8.0, crop=128),
}


def draw_scale(augmentation: ScaleCrop, generator: torch.Generator) -> float:
    """A factor in [1, max_scale], log-uniform: as many batches between 1x and 2x as between 4x and 8x."""
    return float(torch.exp(torch.rand((), generator=generator, dtype=torch.float64) * np.log(augmentation.max_scale)))


def resize_and_crop(images01: torch.Tensor, labels: torch.Tensor, factor: float, crop: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) images in [0, 1] and (B, H, W) labels resized by ``factor`` (bilinear, half-pixel
    centres as cv2 / mmcv; labels nearest), then each cropped at a random place to at most ``crop``."""
    height, width = (max(1, round(side * factor)) for side in images01.shape[-2:])
    images01 = F.interpolate(images01, size=(height, width), mode="bilinear", align_corners=False)
    labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
    crop_h, crop_w = min(height, crop), min(width, crop)
    tops = torch.randint(height - crop_h + 1, (len(images01),), generator=generator).tolist()
    lefts = torch.randint(width - crop_w + 1, (len(images01),), generator=generator).tolist()
    images01 = torch.stack([image[:, t:t + crop_h, l:l + crop_w] for image, t, l in zip(images01, tops, lefts)])
    labels = torch.stack([label[t:t + crop_h, l:l + crop_w] for label, t, l in zip(labels, tops, lefts)])
    return images01, labels


def pretrain_segmenter(toy: Path, folder: Path, key: str, tokenizer, stage: Stage, seed: int, threads: int) -> dict:
    """Train the mmseg segmenter in ``folder`` (config.py + random model.pth) on its dataset's train
    split with the segmentation reward's own loss, scale-augmented as SEGMENTER_AUGMENTATION says;
    rewrites its model.pth, returns its record."""
    from reward_models.segmentation import SegmentationRewardModel

    augmentation = SEGMENTER_AUGMENTATION.get(key)
    dataset, label_column = SEGMENTERS[key]
    with deterministic(seed, key, threads):
        segmenter = SegmentationRewardModel.from_pretrained(str(folder))
        rows = load_rows(toy, dataset, tokenizer, label_column=label_column, label_from_image=segmenter.label_from_image)
        augment = None if augmentation is None else (lambda images, labels, generator: resize_and_crop(
            images, labels, draw_scale(augmentation, generator), augmentation.crop, generator))
        record = train_with_reward_loss(key, segmenter, segmenter.segmentor, (rows["pixel_values"] + 1) / 2,
                                        rows["labels"], stage, seed, augment)
        if augmentation is not None:
            record["augmentation"] = asdict(augmentation)
        save_mmseg_checkpoint(segmenter, Path(folder) / "model.pth", seed)
    return record


# ---------------------------------------------------------------------------------------------
# The whole world
# ---------------------------------------------------------------------------------------------


def pretrain_toy_world(toy: str | os.PathLike, out: str | os.PathLike, seed: int = 0, budget: str = "full",
                       threads: int = 1) -> dict:
    """Write the pretrained copy of the toy world ``toy`` to ``out``; return its manifest (as on disk)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    toy, out = Path(toy), Path(out)
    if budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {sorted(BUDGETS)}, got {budget!r}.")
    source_manifest = json.loads((toy / MANIFEST_NAME).read_text())
    refuse_foreign_folder(out)
    stages = BUDGETS[budget]
    paths = source_manifest["paths"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built next to ``out`` and renamed at the end: an interrupted run leaves no partial world.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        # Exactly the files the toy world's manifest lists: caches that tools leave in dataset
        # folders (datasets' cache-*.arrow) are not part of the world.
        for relative in source_manifest["files"]:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(toy / relative, tmp / relative)
        sd15 = tmp / paths["sd15"]
        tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")
        records = {}

        # Every train image of the four training datasets, with its (first) caption.
        parts = [load_rows(toy, name, tokenizer) for name in IMAGE_DATASETS]
        images = torch.cat([p["pixel_values"] for p in parts])
        input_ids = torch.cat([p["input_ids"] for p in parts])
        print(f"toy pretraining ({budget}, seed {seed}): {len(images)} images at {RESOLUTION} px", flush=True)

        with deterministic(seed, "vae", threads):
            vae = load_diffusers_model(AutoencoderKL, sd15 / "vae", norm_num_groups=VAE_NORM_GROUPS)
            records["vae"] = train_vae(vae, images, stages["vae"], seed)
            vae.save_pretrained(sd15 / "vae")
        with deterministic(seed, "unet", threads):
            unet = load_diffusers_model(UNet2DConditionModel, sd15 / "unet")
            text_encoder = CLIPTextModel.from_pretrained(sd15 / "text_encoder")
            scheduler = DDPMScheduler.from_pretrained(sd15 / "scheduler")
            empty_ids = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids
            records["unet"] = train_unet(unet, vae, text_encoder, scheduler, images, input_ids, empty_ids,
                                         stages["unet"], seed)
            unet.save_pretrained(sd15 / "unet")
            text_encoder.save_pretrained(sd15 / "text_encoder")
        toy_controlnet_from_unet(unet, vae, seed).save_pretrained(tmp / paths["controlnet"])
        records.update(pretrain_reward_models(toy, tmp, paths["reward_models"], tokenizer, stages, seed, threads))

        # Wall times vary from run to run: printed, kept out of the manifest (same seed, same bytes).
        seconds = {name: record.pop("seconds") for name, record in records.items()}
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {key: source_manifest[key] for key in ("generator_version", "seed", "rows", "paths", "architecture")
                    if key in source_manifest}
        manifest["files"] = files
        manifest["pretrained"] = {"budget": budget, "seed": seed, "threads": threads, "resolution": RESOLUTION,
                                  "text_encoder": "trained with the UNet", "models": records}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, record in records.items():
        print(f"  {name:24s} {record['steps']:5d} steps  loss {record['first_loss']:.4f} -> {record['final_loss']:.4f}"
              f"  {seconds[name]:.0f} s")
    return manifest


# ---------------------------------------------------------------------------------------------
# A picture for the docs: the same prompts and seeds through the random and the pretrained world
# ---------------------------------------------------------------------------------------------


def sample_grid(worlds: dict[str, Path], out_png: Path, num_prompts: int = 6, seed: int = 42) -> list[str]:
    """PNG grid: a row of real validation images, then one row of pipeline samples per world.

    Sampling follows the evaluation protocol (UniPC, 20 steps, guidance 7.5, negative prompt
    "worst quality, low quality", seed 42) at 64 px. Returns the prompts (the grid's columns).
    """
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from PIL import Image, ImageOps

    first = next(iter(worlds.values()))
    validation = load_dataset_any(str(first / "datasets" / "MultiGen-20M_canny_eval"), "validation")
    prompts = [validation[i]["text"] for i in range(num_prompts)]
    real = [ImageOps.fit(validation[i]["image"].convert("RGB"), (RESOLUTION, RESOLUTION), Image.BICUBIC)
            for i in range(num_prompts)]
    rows = [real]
    for root in worlds.values():
        pipe = StableDiffusionPipeline.from_pretrained(root / "toy-sd15")
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        rows.append(pipe(prompts, height=RESOLUTION, width=RESOLUTION, num_inference_steps=20, guidance_scale=7.5,
                         negative_prompt=["worst quality, low quality"] * len(prompts), generator=generator).images)
    scale = 2  # 64 px tiles are hard to see in a document
    tile = RESOLUTION * scale
    grid = Image.new("RGB", (tile * num_prompts, tile * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((tile, tile), Image.NEAREST), (c * tile, r * tile))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png, format="PNG")
    return prompts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m toy.pretrain")
    parser.add_argument("--toy", required=True, help="the random toy world to start from (python -m toy.world --out ...)")
    parser.add_argument("--out", required=True, help="where to write the pretrained world (e.g. work_dirs/toy-pretrained)")
    parser.add_argument("--seed", type=int, default=0, help="same seed (and --threads) -> the same bytes in every file")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="small: tens of seconds, for tests; full: the quickstart's world (minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the bytes written depend on it (default 1: fastest on a busy machine)")
    parser.add_argument("--grid", default=None,
                        help="also save a PNG of pipeline samples before / after pretraining (docs/img/toy_pretrain.png)")
    args = parser.parse_args(argv)
    if args.seed < 0 or args.threads < 1:
        parser.error("--seed must be >= 0 and --threads >= 1.")
    start = time.perf_counter()
    manifest = pretrain_toy_world(args.toy, args.out, seed=args.seed, budget=args.budget, threads=args.threads)
    print(f"pretrained toy world ({args.budget}, seed {args.seed}) at {args.out}: {len(manifest['files'])} files, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.grid:
        with deterministic(args.seed, "grid", args.threads):
            sample_grid({"random": Path(args.toy), "pretrained": Path(args.out)}, Path(args.grid))
        print(f"sample grid (rows: real, random world, pretrained world) at {args.grid}")
    return manifest


if __name__ == "__main__":
    main()
