"""toy/pretrain.py: the pretrained toy world learns, loads like the random one, and is reproducible.

One ``--budget small`` run on the 24-row session toy world (about 1 minute on 2 busy cores) is
shared by the tests; the determinism test runs the command a second time in a fresh process.
Whether a model learned is judged with targets written out here from the label maps, against
the random toy world's checkpoint on the same rows, not with the pretraining code's own losses.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_entry
import toy.pretrain
import toy.world

MODELS = ("vae", "unet", "hed", "lineart", "depth", "segmentation_ade20k", "segmentation_cocostuff",
          "segmentation_ade20k_eval", "segmentation_cocostuff_eval", "depth_eval")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(toy_world: Path, dataset: str, **columns) -> dict:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(toy_world / "toy-sd15" / "tokenizer")
    return toy.pretrain.load_rows(toy_world, dataset, tokenizer, **columns)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """(B, H, W) -> (B, H, W) bool: pixels with a 4-neighbour of another class (written independently)."""
    edge = np.zeros(labels.shape, bool)
    dx = labels[:, :, 1:] != labels[:, :, :-1]
    dy = labels[:, 1:, :] != labels[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge


def test_every_loss_falls_and_the_manifest_is_complete(pretrained, toy_world):
    out, manifest = pretrained
    assert json.loads((out / toy.world.MANIFEST_NAME).read_text()) == manifest
    source = json.loads((toy_world / toy.world.MANIFEST_NAME).read_text())
    # toy/world.py's keys with the same values (same datasets, same paths), plus "pretrained".
    assert set(manifest) == set(source) | {"pretrained"}
    assert all(manifest[key] == source[key] for key in ("generator_version", "seed", "rows", "paths"))
    assert set(manifest["files"]) == set(_files(out)) - {toy.world.MANIFEST_NAME}
    assert set(manifest["files"]) == set(source["files"])  # exactly the same layout
    pretrained_section = manifest["pretrained"]
    assert (pretrained_section["budget"], pretrained_section["seed"]) == ("small", 0)
    records = pretrained_section["models"]
    assert set(records) == set(MODELS)
    for name, record in records.items():
        assert record["steps"] == toy.pretrain.BUDGETS["small"][name].steps


def test_vae_and_unet_fit_the_rows_better_than_the_random_world(pretrained, toy_world):
    """Judged here, not from the trainer's own loss record: the VAE's reconstruction error and the
    UNet's epsilon error (x_t and the MSE written out) on training rows, with the same noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out, _ = pretrained
    rows = _rows(toy_world, "MultiGen-20M_train")
    images, input_ids = rows["pixel_values"][:16], rows["input_ids"][:16]
    errors = {}
    for world in (toy_world, out):
        sd = world / "toy-sd15"
        vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
        unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
        text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.mean).sample
            latents = posterior.mean * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.linspace(50, 950, len(images)).long()
            betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # SD1.5's scaled-linear schedule
            abar = torch.from_numpy(np.cumprod(1 - betas)[timesteps.numpy()]).float().view(-1, 1, 1, 1)
            noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
        errors[world] = {"vae": float((reconstruction - images).abs().mean()),
                         "unet": float(((prediction - noise) ** 2).mean())}
    for name in ("vae", "unet"):
        assert errors[out][name] < 0.8 * errors[toy_world][name], (name, errors)


def test_vae_scaling_factor_is_one_over_latent_std(pretrained, toy_world):
    from diffusers import AutoencoderKL

    out, manifest = pretrained
    vae = AutoencoderKL.from_pretrained(out / "toy-sd15" / "vae").eval()
    assert vae.config.scaling_factor == manifest["pretrained"]["models"]["vae"]["scaling_factor"] != toy.world.VAE_SCALING_FACTOR
    # The toy's VAE config, but for the scaling factor and the GroupNorm groups (see the module).
    written, source = (json.loads((world / "toy-sd15" / "vae" / "config.json").read_text()) for world in (out, toy_world))
    assert {key for key in written.keys() | source.keys() if written.get(key) != source.get(key)} == {
        "scaling_factor", "norm_num_groups"}
    images = _rows(toy_world, "MultiGen-20M_train")["pixel_values"]
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(123))
    # One dataset of the four, other noise: the same std within sampling error.
    assert abs(float(latents.std()) * vae.config.scaling_factor - 1.0) < 0.15


def test_loads_through_the_pipeline_and_the_reward_registry(pretrained, toy_world):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from reward_models import build_reward_model

    out, manifest = pretrained
    controlnet = ControlNetModel.from_pretrained(out / manifest["paths"]["controlnet"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(out / manifest["paths"]["sd15"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", image=Image.new("RGB", (64, 64)), height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    # The ControlNet copies the *pretrained* UNet's encoder.
    unet_state = pipe.unet.state_dict()
    for key, value in controlnet.state_dict().items():
        if key.startswith(("conv_in.", "down_blocks.", "mid_block.", "time_embedding.")):
            torch.testing.assert_close(value, unet_state[key], rtol=0, atol=0)
    # Weights were trained, the rest copied byte for byte.
    before, after = _files(toy_world), _files(out)
    for name in ("toy-sd15/unet/diffusion_pytorch_model.safetensors", "toy-sd15/vae/diffusion_pytorch_model.safetensors",
                 "toy-controlnet/diffusion_pytorch_model.safetensors", "reward_models/ControlNetHED.pth",
                 "toy-sd15/text_encoder/model.safetensors"):  # the text encoder trains with the UNet
        assert before[name] != after[name], name
    for name in ("datasets/Captioned_ADE20K/train/data-00000-of-00001.arrow",
                 "clip/model.safetensors", "reward_models/dpt-hybrid-midas/preprocessor_config.json"):
        assert before[name] == after[name], name

    # Every learned reward model loads strictly through the registry from the written paths, and
    # fits its training rows better than the random toy checkpoint it started from.
    def rel(key):
        return manifest["paths"]["reward_models"][key]

    ade = _rows(toy_world, "Captioned_ADE20K", label_column="seg_map", label_from_image=np.asarray)
    images01 = (ade["pixel_values"] + 1) / 2
    edges = torch.from_numpy(_boundaries(ade["labels"].numpy())).float()[:, None]
    thick_edges = torch.nn.functional.max_pool2d(edges, 3, 1, 1)
    targets = {"hed": thick_edges, "lineart": 1 - edges}
    for task, target in targets.items():
        losses = {}
        for world in (toy_world, out):
            model = build_reward_model(task, str(world / rel(task)))
            with torch.no_grad():
                losses[world] = float(((model(images01) - target) ** 2).mean())
        assert losses[out] < 0.8 * losses[toy_world], (task, losses)

    depth_rows = _rows(toy_world, "MultiGen-20M_depth", conditioning_image_column="control_depth")
    checks = [("depth", rel("depth"), None, depth_rows), ("depth", rel("depth_eval"), None, depth_rows)]
    for key, dataset, label_column in (("segmentation_ade20k", "Captioned_ADE20K", "control_seg"),
                                       ("segmentation_cocostuff", "Captioned_COCOStuff", "panoptic_seg_map"),
                                       ("segmentation_ade20k_eval", "Captioned_ADE20K", "control_seg"),
                                       ("segmentation_cocostuff_eval", "Captioned_COCOStuff", "panoptic_seg_map")):
        model = build_reward_model("segmentation", str(out / rel(key)))
        checks.append(("segmentation", rel(key), label_column,
                       _rows(toy_world, dataset, label_column=label_column, label_from_image=model.label_from_image)))
    for task, path, label_column, batch in checks:
        losses = {}
        for world in (toy_world, out):
            model = build_reward_model(task, str(world / path))
            with torch.no_grad():
                losses[world] = float(model.loss(model((batch["pixel_values"] + 1) / 2), model.target(batch)).mean())
        assert losses[out] < 0.8 * losses[toy_world], (path, losses)


def test_same_seed_same_bytes_in_a_new_process(pretrained, toy_world, tmp_path):
    out, _ = pretrained
    again = tmp_path / "again"
    run_entry(["-m", "toy.pretrain", "--toy", str(toy_world), "--out", str(again), "--budget", "small"])
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left behind


def test_refuses_to_replace_a_folder_that_is_not_a_toy_world(toy_world, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a toy world"):
        toy.pretrain.pretrain_toy_world(toy_world, tmp_path, budget="small")
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_scale_augmentation_resizes_as_cv2_and_crops_labels_with_their_pixels():
    """The evaluation segmenters' batches: checked against cv2's bilinear resize (mmcv's, which the
    paper protocol's test pipeline uses) and numpy's pixel repetition for the labels. The images
    encode their coordinates, so where each crop was taken is read off its first pixel."""
    import cv2

    size, factor, crop = 16, 8, 40
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([xs / (size - 1), ys / (size - 1), (xs * ys) % 5 / 4.0]).astype(np.float32)  # (3, H, W)
    labels = np.random.default_rng(0).integers(0, 7, (2, size, size))
    images = torch.from_numpy(np.stack([image, image[:, ::-1].copy()]))
    out_images, out_labels = toy.pretrain.resize_and_crop(images, torch.from_numpy(labels), factor, crop,
                                                          torch.Generator().manual_seed(3))
    assert out_images.shape == (2, 3, crop, crop) and out_labels.shape == (2, crop, crop)
    for i in range(2):
        full = cv2.resize(images[i].numpy().transpose(1, 2, 0), (size * factor, size * factor),
                          interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        # Channel 1 rises with y in both images; channel 0 rises with x in the first, falls in the second.
        top = int(np.argmin(np.abs(full[1, :, 0] - out_images[i, 1, 0, 0].item())))
        column = full[0, top]
        left = int(np.argmin(np.abs(column - out_images[i, 0, 0, 0].item())))
        np.testing.assert_allclose(out_images[i].numpy(), full[:, top:top + crop, left:left + crop], atol=1e-5)
        repeated = np.repeat(np.repeat(labels[i], factor, axis=0), factor, axis=1)
        np.testing.assert_array_equal(out_labels[i].numpy(), repeated[top:top + crop, left:left + crop])
    # Smaller than the crop: the whole resized image, at factor 1 the batch itself.
    same_images, same_labels = toy.pretrain.resize_and_crop(images, torch.from_numpy(labels), 1.0, crop,
                                                            torch.Generator().manual_seed(3))
    assert torch.equal(same_images, images) and torch.equal(same_labels, torch.from_numpy(labels))


def test_evaluation_segmenters_train_on_every_scale_up_to_the_paper_protocols():
    """The paper protocol segments a 64 px toy image at 512 px (a short side of 512: 8x), the
    corrected scoring at 64 px; the evaluation segmenters' scale draws cover both ends, the
    rewarding segmenters (which see 64 px images in training) are not augmented."""
    from eval.eval_seg import PAPER_TEST_SCALE

    paper_factor = min(PAPER_TEST_SCALE) / toy.pretrain.RESOLUTION
    assert set(toy.pretrain.SEGMENTER_AUGMENTATION) == {"segmentation_ade20k_eval", "segmentation_cocostuff_eval"}
    for augmentation in toy.pretrain.SEGMENTER_AUGMENTATION.values():
        assert augmentation.max_scale == paper_factor
        generator = torch.Generator().manual_seed(0)
        factors = np.array([toy.pretrain.draw_scale(augmentation, generator) for _ in range(400)])
        assert factors.min() >= 1 and factors.max() <= paper_factor
        assert factors.min() < 1.1 and factors.max() > 0.9 * paper_factor
        # Log-uniform: as many draws below the geometric middle as above it.
        assert abs(np.mean(factors < np.sqrt(paper_factor)) - 0.5) < 0.08
