"""The toy world (toy/world.py): determinism, SD1.5 layout, and labels that agree with the drawings.

Expected values are written out here (SD1.5's scheduler and token ids, mmseg's first palette
colours) or recomputed independently from the scene description, not read back from the
generator's own constants. About 40 s on 2 busy cores (most of it generating three small worlds).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import toy.world

DATASET_LAYOUT = {  # name -> {split: columns}, as on the hub (limingcv/...)
    "MultiGen-20M_train": {"train": ["image", "text"]},
    "MultiGen-20M_canny_eval": {"validation": ["image", "text"]},
    "MultiGen-20M_depth": {"train": ["image", "text", "control_depth"]},
    "MultiGen-20M_depth_eval": {"validation": ["image", "text", "control_depth"]},
    "Captioned_ADE20K": {s: ["image", "prompt", "control_seg", "seg_map"] for s in ("train", "validation")},
    "Captioned_COCOStuff": {s: ["image", "prompt", "control_seg", "panoptic_seg_map"] for s in ("train", "validation")},
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    first = toy.world.make_toy_world(tmp_path / "a", seed=0, rows=3)
    toy.world.make_toy_world(tmp_path / "b", seed=0, rows=3)
    toy.world.make_toy_world(tmp_path / "c", seed=1, rows=3)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) > 40 and a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
    # The manifest lists every file with its size.
    assert set(first["files"]) == set(a) - {toy.world.MANIFEST_NAME}
    assert all(len(a[name]) == size for name, size in first["files"].items())
    # Another seed: other weights and other data; no temporary folder left behind.
    for name in ("toy-sd15/unet/diffusion_pytorch_model.safetensors",
                 "toy-controlnet/diffusion_pytorch_model.safetensors",
                 "datasets/Captioned_ADE20K/train/data-00000-of-00001.arrow"):
        assert a[name] != c[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]

    # A complete world is reused as it is: nothing rewritten.
    unet = tmp_path / "a" / "toy-sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = unet.stat().st_mtime_ns
    start = time.perf_counter()
    again = toy.world.make_toy_world(tmp_path / "a", seed=0, rows=3)
    assert time.perf_counter() - start < 2.0 and unet.stat().st_mtime_ns == mtime
    assert again["paths"]["sd15"] == str((tmp_path / "a" / "toy-sd15").resolve())
    # A truncated file makes the world incomplete: it is rebuilt.
    unet.write_bytes(b"")
    toy.world.make_toy_world(tmp_path / "a", seed=0, rows=3)
    assert unet.read_bytes() == a["toy-sd15/unet/diffusion_pytorch_model.safetensors"]


def test_refuses_to_replace_a_folder_that_is_not_a_toy_world(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a toy world"):
        toy.world.make_toy_world(tmp_path, seed=0, rows=2)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_scheduler_is_sd15(toy_world):
    from diffusers import DDPMScheduler

    config = json.loads((toy_world / "toy-sd15" / "scheduler" / "scheduler_config.json").read_text())
    sd15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True, "trained_betas": None}
    assert {key: config[key] for key in sd15} == sd15
    scheduler = DDPMScheduler.from_pretrained(toy_world / "toy-sd15", subfolder="scheduler")
    # scaled_linear: betas linear in sqrt(beta) (Rombach et al. / SD1.5).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)


def test_tokenizer_is_sd15(toy_world):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(toy_world / "toy-sd15" / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|endoftext|>", "<|startoftext|>", "<|endoftext|>")
    padded = tokenizer("A RED circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:5] == [49406, 320, 736, 7117, 49407] and set(padded[4:]) == {49407}


def test_pipeline_loads_offline_and_uses_the_condition(toy_world, monkeypatch):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    controlnet = ControlNetModel.from_pretrained(toy_world / "toy-controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(toy_world / "toy-sd15", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae.config.latent_channels == 4
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim

    def generate(condition: Image.Image) -> np.ndarray:
        out = pipe("a red circle", image=condition, height=64, width=96, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images[0]

    black = generate(Image.new("RGB", (96, 64)))
    assert black.shape == (64, 96, 3) and np.isfinite(black).all()
    pil = pipe("a red circle", image=Image.new("RGB", (64, 64)), height=64, width=64, num_inference_steps=2).images[0]
    assert pil.size == (64, 64)
    # The toy ControlNet is "pretrained" (non-zero zero-convolutions): its condition changes the image.
    white = generate(Image.new("RGB", (96, 64), (255, 255, 255)))
    assert np.abs(white - black).max() > 1e-3


def test_datasets_have_the_real_columns_and_splits(toy_world):
    import datasets

    from conftest import TOY_ROWS

    for name, splits in DATASET_LAYOUT.items():
        dataset = datasets.load_from_disk(str(toy_world / "datasets" / name))
        assert sorted(dataset) == sorted(splits), name
        for split, columns in splits.items():
            assert sorted(dataset[split].column_names) == sorted(columns), (name, split)
            assert dataset[split].num_rows == TOY_ROWS
            for column in columns:
                if column not in ("text", "prompt"):
                    assert isinstance(dataset[split].features[column], datasets.Image), (name, column)


def _load(toy_world: Path, name: str, split: str):
    import datasets

    return datasets.load_from_disk(str(toy_world / "datasets" / name))[split]


def test_segmentation_maps_agree_with_the_shapes(toy_world):
    ade = _load(toy_world, "Captioned_ADE20K", "validation")
    palette = toy.world.ade20k_palette()
    # mmseg's ADE20K palette (mmseg/datasets/ade.py) after black for "other".
    assert palette.shape == (151, 3) and palette[:3].tolist() == [[0, 0, 0], [120, 120, 120], [180, 120, 120]]
    # The toy parses mmseg's source; the reward models carry a copied table: they must agree.
    from reward_models.palettes import ADE20K_PALETTE, COCO_STUFF_PALETTE

    assert palette[1:].tolist() == [list(c) for c in ADE20K_PALETTE]
    assert toy.world.cocostuff_palette().tolist() == [list(c) for c in COCO_STUFF_PALETTE]
    ade_shape_class = {"circle": 1 + 119, "square": 1 + 41, "triangle": 1 + 114}  # ball, box, tent
    for index in range(8):
        row, scene = ade[index], toy.world.toy_scene(0, "Captioned_ADE20K", "validation", index)
        seg = np.asarray(row["seg_map"])
        assert seg.shape == (scene.height, scene.width) == (row["image"].height, row["image"].width)
        assert (np.asarray(row["control_seg"].convert("RGB")) == palette[seg]).all()
        for shape in scene.shapes:
            assert seg[shape.cy, shape.cx] == ade_shape_class[shape.kind], (index, shape)
        assert (seg[0, 0] == 0) == scene.framed

    coco = _load(toy_world, "Captioned_COCOStuff", "train")
    coco_palette = toy.world.cocostuff_palette()
    coco_shape_class = {"circle": 32, "square": 62, "triangle": 33}  # sports ball, tv, kite
    saw_ignore = False
    for index in range(8):
        row, scene = coco[index], toy.world.toy_scene(0, "Captioned_COCOStuff", "train", index)
        labels = np.asarray(row["panoptic_seg_map"])
        assert labels.shape == (scene.height, scene.width)
        assert set(np.unique(labels)) <= set(range(171)) | {255}
        labelled = labels != 255
        saw_ignore |= not labelled.all()
        rendered = np.asarray(row["control_seg"].convert("RGB"))
        assert (rendered[labelled] == coco_palette[labels[labelled]]).all()
        for shape in scene.shapes:
            assert labels[shape.cy, shape.cx] == coco_shape_class[shape.kind], (index, shape)
    assert saw_ignore


def test_depth_maps_agree_with_the_shapes(toy_world):
    depth_rows = _load(toy_world, "MultiGen-20M_depth", "train")
    for index in range(8):
        row, scene = depth_rows[index], toy.world.toy_scene(0, "MultiGen-20M_depth", "train", index)
        depth = np.asarray(row["control_depth"].convert("L")).astype(int)
        assert depth.shape == (scene.height, scene.width)
        centres = [depth[s.cy, s.cx] for s in scene.shapes]
        background = max(depth[0, 0], depth[-1, 0], depth[0, -1], depth[-1, -1])
        # MiDaS convention: brighter = nearer; shapes are nearer than the background and each
        # shape drawn later is nearer than the ones before it.
        assert min(centres) > background, index
        assert centres == sorted(centres) and len(set(centres)) == len(centres), index
        if scene.bottom is not None:  # the ground comes towards the camera
            assert depth[-1, 0] > depth[0, 0]


def test_rows_vary_like_real_data(toy_world):
    train = _load(toy_world, "MultiGen-20M_train", "train")
    images = [train[i]["image"] for i in range(train.num_rows)]
    assert {image.mode for image in images} == {"RGB", "L", "RGBA"}
    sizes = {image.size for image in images}
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)
    assert min(min(s) for s in sizes) >= 64 and max(max(s) for s in sizes) <= 128
    assert all(isinstance(text, str) and text for text in train["text"])
    prompts = _load(toy_world, "Captioned_COCOStuff", "train")["prompt"]
    assert all(isinstance(p, list) for p in prompts) and {len(p) for p in prompts} == {1, 2, 3}
    # Captions describe the scene that was drawn.
    scene = toy.world.toy_scene(0, "MultiGen-20M_train", "train", 0)
    assert train[0]["text"].startswith(f"a{'n' if scene.shapes[0].colour[0] in 'aeiou' else ''} "
                                       f"{scene.shapes[0].colour} {scene.shapes[0].kind}")


def test_metric_models_load_and_score(toy_world):
    from transformers import CLIPModel, CLIPProcessor

    inception = torch.jit.load(str(toy_world / "fid" / "inception-toy.pt")).eval()
    images = torch.rand(2, 3, 80, 64) * 255
    features = inception(images)
    assert features.shape == (2, 64) and features.std() > 0
    # clean-fid's "clean" path: 299 px input, (x - 128) / 128, then base.layers(...).view(B, D).
    resized = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inception.layers((resized - 128) / 128).view(2, 64), features)

    # torchmetrics 1.9's CLIPScore cannot call transformers 5 (get_image_features returns a
    # ModelOutput there), so this checks what a CLIP-score needs: both towers, same width.
    clip_dir = toy_world / "clip"
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    assert processor.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    inputs = processor(text=["a red circle", "a blue square"], images=[np.zeros((64, 80, 3), np.uint8)] * 2,
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == out.text_embeds.shape == (2, 32)
    assert torch.isfinite(out.logits_per_image).all() and out.text_embeds[0].ne(out.text_embeds[1]).any()


def test_the_f4_architecture_has_16_by_16_latents_and_a_matching_controlnet(tmp_path):
    """The pretrained world's shape (toy/world.py ARCHITECTURES["f4"]): a 4x VAE, a 3-level UNet, and a
    ControlNet whose condition encoder brings the 64 px condition to the 16 x 16 latent grid."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from toy.world import _write_sd15

    _write_sd15(tmp_path, 0, "f4")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "toy-controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "toy-sd15", controlnet=controlnet,
                                                             safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4 and len(pipe.unet.config.block_out_channels) == 3
    condition = torch.rand(1, 3, 64, 64)
    assert controlnet.controlnet_cond_embedding(condition).shape == (1, 16, 16, 16)
    latents = pipe.vae.encode(condition * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", image=Image.new("RGB", (64, 64)), height=64, width=64, num_inference_steps=2,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)
