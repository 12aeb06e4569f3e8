"""Reward models: loading in the published formats, values, gradients, per-sample losses.

Every model loads from the toy checkpoints written by ``toy.reward_checkpoints`` (same keys as
the published files, smaller widths). Canny is checked against an independent numpy/scipy
implementation; segmentation also builds the real mmseg configs with random weights.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from reward_models import DEFAULT_REWARD_MODEL_PATHS, REWARD_MODELS, build_reward_model
from reward_models.base import load_state_dict_file
from reward_models.canny import canny_edges, canny_magnitude
from reward_models.palettes import ADE20K_PALETTE, ADE20K_PALETTE_WITH_BACKGROUND, COCO_STUFF_PALETTE, ade20k_palette_to_label
from toy.reward_checkpoints import write_toy_dpt, write_toy_hed, write_toy_lineart, write_toy_segmenter

ODD_SIZE = (70, 54)


def mmseg_available() -> bool:
    try:
        import mmseg.models  # noqa: F401  (needs mmcv with compiled ops)
    except Exception:
        return False
    return True


needs_mmseg = pytest.mark.skipif(not mmseg_available(), reason="mmseg.models does not import (mmcv with ops missing)")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_reward_models")
    write_toy_hed(root / "ControlNetHED.pth", seed=0)
    write_toy_lineart(root / "lineart" / "model.pth", seed=1)
    write_toy_dpt(root / "dpt-hybrid-midas", seed=2)
    return root


@pytest.fixture(scope="module")
def toy_seg_dir(tmp_path_factory):
    if not mmseg_available():
        pytest.skip("mmseg.models does not import (mmcv with ops missing)")
    root = tmp_path_factory.mktemp("toy_segmenters")
    write_toy_segmenter(root / "ade20k_seg", seed=3, dataset_type="ADE20KDataset")
    write_toy_segmenter(root / "cocostuff_seg", seed=4, dataset_type="COCOStuffDataset")
    return root


@pytest.fixture(scope="module")
def models(toy_dir):
    return {
        "canny": build_reward_model("canny"),
        "hed": build_reward_model("hed", str(toy_dir / "ControlNetHED.pth")),
        "lineart": build_reward_model("lineart", str(toy_dir / "lineart" / "model.pth")),
        "depth": build_reward_model("depth", str(toy_dir / "dpt-hybrid-midas")),
    }


def smooth_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Images with structure at several scales (edges for canny, not just noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8 + 1, width // 8 + 1, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    image = image + 0.15 * torch.rand(batch, 3, height, width, generator=generator)
    image[:, :, height // 3 : height // 2, width // 4 : width // 2] = 0.9  # a sharp rectangle
    return image.clamp(0, 1)


def batch_for(task: str, images: torch.Tensor, model) -> dict:
    """A collated batch whose target is the reward output of ``images`` themselves."""
    batch = {"pixel_values": images * 2 - 1}
    if task == "depth":
        batch["conditioning_pixel_values"] = model.extract_condition(images)
    return batch


# ---------------------------------------------------------------- canny


def numpy_canny_magnitude(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Independent float64 Canny of one RGB image (3, H, W): grey, blur, Sobel, NMS at 45 degrees.

    Border rules as kornia: reflect for the blur, replicate for Sobel, neighbours outside the
    image count as a flat pixel; a pixel equal to a neighbour along its gradient is not a maximum
    (kornia 0.7, the original's version, drops both pixels of a tie; 0.9 keeps one).
    """
    grey = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    x = np.arange(5) - 2
    gauss = np.exp(-(x**2) / 2.0)
    gauss /= gauss.sum()
    blurred = ndimage.correlate(grey, np.outer(gauss, gauss), mode="mirror")
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    gx = ndimage.correlate(blurred, sobel_x, mode="nearest")
    gy = ndimage.correlate(blurred, sobel_x.T, mode="nearest")
    magnitude = np.sqrt(gx**2 + gy**2 + eps)
    direction = np.round(np.arctan2(gy, gx) / (math.pi / 4)).astype(int) % 8
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]
    flat = math.sqrt(eps)
    height, width = grey.shape
    out = np.zeros_like(magnitude)
    for i in range(height):
        for j in range(width):
            keep = magnitude[i, j] > flat
            for k in (direction[i, j], (direction[i, j] + 4) % 8):
                di, dj = offsets[k]
                ni, nj = i + di, j + dj
                neighbour = magnitude[ni, nj] if 0 <= ni < height and 0 <= nj < width else flat
                keep &= magnitude[i, j] > neighbour
            out[i, j] = magnitude[i, j] if keep else 0.0
    return out


def test_canny_matches_independent_numpy_implementation():
    images = smooth_images(2, 40, 36, seed=0)
    ours = canny_magnitude(images)[:, 0].double().numpy()
    for sample in range(2):
        reference = numpy_canny_magnitude(images[sample].double().numpy())
        same_support = (ours[sample] > 0) == (reference > 0)
        # float32 vs float64 may flip a near-tie in NMS; nothing more.
        assert same_support.mean() > 0.995
        assert (reference > 0).sum() > 50  # the test image really has edges
        both = (ours[sample] > 0) & (reference > 0)
        np.testing.assert_allclose(ours[sample][both], reference[both], rtol=1e-4, atol=1e-5)


def test_canny_edges_and_condition_follow_the_thresholds():
    images = smooth_images(2, 48, 40, seed=1)
    magnitude = canny_magnitude(images)
    edges = canny_edges(magnitude)
    above = magnitude > 0.1
    assert above.any() and ((magnitude > 0) & ~above).any()
    assert torch.equal(edges[above], magnitude[above])
    assert (edges[~above] == 0).all()
    condition = build_reward_model("canny").extract_condition(images)
    assert condition.shape == (2, 3, 48, 40)
    assert torch.equal(condition[:, 0], condition[:, 2])
    assert torch.equal(condition[:, :1], edges)  # not clamped: the original fed values above 1


def test_canny_half_precision_input_computes_in_float32():
    images = smooth_images(2, 32, 32, seed=2)
    model = build_reward_model("canny")
    out_bf16 = model(images.bfloat16())
    assert out_bf16.dtype == torch.float32 and torch.isfinite(out_bf16).all()
    out_fp32 = model(images.bfloat16().float())
    assert torch.equal(out_bf16, out_fp32)


# ---------------------------------------------------------------- all tasks


@pytest.mark.parametrize("task", ["canny", "hed", "lineart", "depth"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_output_shape_loss_and_gradient(models, task, batch_size):
    model = models[task]
    generated = smooth_images(batch_size, *ODD_SIZE, seed=3).requires_grad_(True)
    real = smooth_images(batch_size, *ODD_SIZE, seed=4)
    output = model(generated)
    assert output.shape == (batch_size, 1, *ODD_SIZE)
    assert torch.isfinite(output).all()
    loss = model.loss(output, model.target(batch_for(task, real, model)))
    assert loss.shape == (batch_size,) and loss.dtype == torch.float32
    assert (loss > 0).all()
    loss.sum().backward()
    # The test the original HED reward fails (defect 1: uint8 quantisation kills the gradient).
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    condition = model.extract_condition(real)
    assert condition.shape == (batch_size, 3, *ODD_SIZE)
    # canny's training input is the unclamped magnitude (the original's); the others are maps in [0, 1]
    assert condition.min() >= 0 and (task == "canny" or condition.max() <= 1)


@pytest.mark.parametrize("task", ["canny", "hed", "lineart", "depth"])
def test_loss_is_zero_for_the_target_image_and_per_sample(models, task):
    model = models[task]
    real = smooth_images(3, *ODD_SIZE, seed=5)
    target = model.target(batch_for(task, real, model))
    assert model.loss(model(real), target).abs().max() < 1e-6
    # Changing sample 1 changes only entry 1 of the per-sample loss.
    generated = smooth_images(3, *ODD_SIZE, seed=6)
    before = model.loss(model(generated), target)
    generated[1] = smooth_images(1, *ODD_SIZE, seed=7)[0]
    after = model.loss(model(generated), target)
    assert after[1] != before[1]
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=1e-5, atol=1e-7)


def test_pixel_loss_is_squared_error_mean_over_channels(models):
    model = models["hed"]
    output, target = torch.rand(2, 1, 5, 4), torch.rand(2, 1, 5, 4)
    expected = ((output - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(model.loss(output, target), expected)
    canny_out, canny_target = torch.rand(2, 3, 5, 4), torch.rand(2, 3, 5, 4)  # canny: mean over C, H, W
    torch.testing.assert_close(models["canny"].loss(canny_out, canny_target), ((canny_out - canny_target) ** 2).mean(dim=(1, 2, 3)))


def test_models_are_frozen(models):
    for model in models.values():
        model.train()  # a parent module's train() must not switch BatchNorm/dropout on
        assert not model.training
        assert all(not parameter.requires_grad for parameter in model.parameters())


# ---------------------------------------------------------------- HED / line drawing checkpoints

# From REFERENCE.md: ControlNetHED_Apache2 and the informative-drawings generator at the published width.
EXPECTED_HED_SHAPES = {"norm": (1, 3, 1, 1)}
for _index, (_in, _out, _convs) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)], 1):
    for _k in range(_convs):
        EXPECTED_HED_SHAPES[f"block{_index}.convs.{_k}.weight"] = (_out, _in if _k == 0 else _out, 3, 3)
        EXPECTED_HED_SHAPES[f"block{_index}.convs.{_k}.bias"] = (_out,)
    EXPECTED_HED_SHAPES[f"block{_index}.projection.weight"] = (1, _out, 1, 1)
    EXPECTED_HED_SHAPES[f"block{_index}.projection.bias"] = (1,)

EXPECTED_LINEART_SHAPES = {
    "model0.1.weight": (64, 3, 7, 7), "model0.1.bias": (64,),
    "model1.0.weight": (128, 64, 3, 3), "model1.0.bias": (128,),
    "model1.3.weight": (256, 128, 3, 3), "model1.3.bias": (256,),
    "model3.0.weight": (256, 128, 3, 3), "model3.0.bias": (128,),  # ConvTranspose2d: (in, out, k, k)
    "model3.3.weight": (128, 64, 3, 3), "model3.3.bias": (64,),
    "model4.1.weight": (1, 64, 7, 7), "model4.1.bias": (1,),
}
for _block in range(3):
    for _conv in (1, 5):
        EXPECTED_LINEART_SHAPES[f"model2.{_block}.conv_block.{_conv}.weight"] = (256, 256, 3, 3)
        EXPECTED_LINEART_SHAPES[f"model2.{_block}.conv_block.{_conv}.bias"] = (256,)


def test_published_key_names_and_shapes_at_default_width():
    from reward_models.hed import HEDRewardModel
    from reward_models.lineart import LineArtRewardModel

    hed = {key: tuple(value.shape) for key, value in HEDRewardModel().network.state_dict().items()}
    lineart = {key: tuple(value.shape) for key, value in LineArtRewardModel().network.state_dict().items()}
    assert hed == EXPECTED_HED_SHAPES
    assert lineart == EXPECTED_LINEART_SHAPES


def test_width_is_inferred_from_the_checkpoint(models, toy_dir):
    state_dict = load_state_dict_file(toy_dir / "ControlNetHED.pth", "HED")
    assert set(state_dict) == set(EXPECTED_HED_SHAPES)
    assert state_dict["block1.convs.0.weight"].shape[0] == 4
    assert models["hed"].network.block5.convs[0].out_channels == 32
    assert models["lineart"].network.model2[0].conv_block[1].in_channels == 16


def test_strict_loading_rejects_wrong_checkpoints(toy_dir, tmp_path):
    with pytest.raises(RuntimeError, match="not a ControlNetHED checkpoint"):
        build_reward_model("hed", str(toy_dir / "lineart" / "model.pth"))
    state_dict = load_state_dict_file(toy_dir / "ControlNetHED.pth", "HED")
    del state_dict["block3.projection.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state_dict, broken)
    with pytest.raises(RuntimeError, match=r"(?s)broken\.pth does not match.*block3\.projection\.bias"):
        build_reward_model("hed", str(broken))
    with pytest.raises(FileNotFoundError, match="--reward_model_name_or_path"):
        build_reward_model("lineart", str(tmp_path / "missing.pth"))


class CodeRunningObject:
    """Unpickling this with plain pickle would run a shell command (creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_checkpoint_loading_never_runs_pickled_code(tmp_path, legacy_format):
    from mmengine.logging import HistoryBuffer

    history = HistoryBuffer()
    history.update(1.5)
    marker = tmp_path / "code_ran"
    state_dict = {"module.weight": torch.arange(3.0), "half": torch.ones(2, dtype=torch.bfloat16)}
    # An mmengine training checkpoint: numpy in meta, a HistoryBuffer in message_hub (pickled
    # through getattr, which no allow-list admits), plus an object that runs code if trusted.
    checkpoint = {"meta": {"seed": np.int64(3), "hist": np.zeros(2)}, "message_hub": {"log_scalars": {"loss": history}},
                  "hook": CodeRunningObject(marker), "state_dict": state_dict}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    loaded = load_state_dict_file(path, "test checkpoint", mmengine_checkpoint=True)
    assert not marker.exists()
    assert set(loaded) == {"weight", "half"}  # DataParallel prefix stripped
    assert torch.equal(loaded["weight"], state_dict["module.weight"]) and loaded["half"].dtype == torch.bfloat16
    torch.save([torch.zeros(1)], path)
    with pytest.raises(RuntimeError, match="not a state dict of tensors"):
        load_state_dict_file(path, "test checkpoint")


def test_url_uses_the_cache_and_fails_offline_with_instructions(toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLNETPP_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"  # port 9: nothing listens
    with pytest.raises(RuntimeError, match=r"Could not download the HED checkpoint.*127\.0\.0\.1:9"):
        build_reward_model("hed", url)
    cached = tmp_path / "127.0.0.1:9__lllyasviel__Annotators__resolve__main__ControlNetHED.pth"
    cached.write_bytes((toy_dir / "ControlNetHED.pth").read_bytes())
    assert build_reward_model("hed", url).network.block1.convs[0].out_channels == 4


def test_toy_checkpoints_are_deterministic(tmp_path):
    for folder in ("a", "b"):
        write_toy_hed(tmp_path / folder / "hed.pth", seed=0)
        write_toy_lineart(tmp_path / folder / "lineart.pth", seed=0)
    for name in ("hed.pth", "lineart.pth"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_toy_hed(tmp_path / "c" / "hed.pth", seed=1)
    assert (tmp_path / "a" / "hed.pth").read_bytes() != (tmp_path / "c" / "hed.pth").read_bytes()


# ---------------------------------------------------------------- depth


def test_depth_target_is_per_sample_and_safe_on_zero_maps(models):
    model = models["depth"]
    condition = torch.rand(3, 3, 20, 24)
    condition[1] = 0  # an all-zero depth map
    target = model.target({"conditioning_pixel_values": condition})
    assert torch.isfinite(target).all() and (target[1] == 0).all()
    expected = condition[0].mean(0) / condition[0].mean(0).max()
    torch.testing.assert_close(target[0, 0], expected)
    # Any batch size (defect 4): a batch of 2 gives the same rows as the batch of 3.
    torch.testing.assert_close(model.target({"conditioning_pixel_values": condition[:2]}), target[:2])
    output = model(smooth_images(3, 20, 24, seed=8))
    assert torch.allclose(output.flatten(1).amax(1), torch.ones(3))


def test_depth_input_size_comes_from_the_preprocessor_config(models):
    assert models["depth"].input_size == (64, 64)


# ---------------------------------------------------------------- registry


def test_registry_and_defaults():
    assert set(REWARD_MODELS) == {"canny", "hed", "lineart", "depth", "segmentation"}
    assert set(DEFAULT_REWARD_MODEL_PATHS) == set(REWARD_MODELS)
    assert DEFAULT_REWARD_MODEL_PATHS["segmentation"] == "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py"
    with pytest.raises(ValueError, match="choose one of"):
        build_reward_model("pose")
    with pytest.raises(ValueError, match="must be 'canny'"):
        build_reward_model("canny", "some/path.pth")
    assert [REWARD_MODELS[task].needs_condition_column for task in ("canny", "hed", "lineart", "depth", "segmentation")] == [
        False, False, False, True, True]
    with pytest.raises(TypeError, match="segmentation only"):
        build_reward_model("canny").label_from_image(np.zeros((2, 2, 3), np.uint8))


# ---------------------------------------------------------------- segmentation labels (no mmseg needed)


def test_ade20k_palette_round_trips_all_151_colours():
    image = np.array(ADE20K_PALETTE_WITH_BACKGROUND, dtype=np.uint8)[None]  # (1, 151, 3)
    labels = ade20k_palette_to_label(image)[0]
    assert labels[0] == 255  # black background is ignored
    expected = np.arange(150)
    # mmseg paints classes 6 and 48 with the same grey; the first wins, as in the original argmin.
    assert ADE20K_PALETTE[6] == ADE20K_PALETTE[48] == (140, 140, 140)
    expected[48] = 6
    np.testing.assert_array_equal(labels[1:], expected)
    # Nearest colour, not exact: a slightly off colour (resampling, compression) maps back.
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ade20k_palette_to_label(noisy)[0], labels)


def test_index_label_formats():
    from reward_models.segmentation import label_image_to_index

    label = np.array([[0, 1, 5], [170, 255, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(label_image_to_index(label, "index"), label.astype(np.int64))
    np.testing.assert_array_equal(label_image_to_index(label, "index_reduce_zero"), [[255, 0, 4], [169, 255, 2]])
    with pytest.raises(ValueError, match="single-channel"):
        label_image_to_index(np.random.default_rng(0).integers(0, 255, (4, 4, 3)), "index")


@needs_mmseg
def test_palettes_equal_mmseg_metainfo():
    from mmseg.datasets import ADE20KDataset, COCOStuffDataset

    assert [tuple(c) for c in ADE20KDataset.METAINFO["palette"]] == list(ADE20K_PALETTE)
    assert [tuple(c) for c in COCOStuffDataset.METAINFO["palette"]] == list(COCO_STUFF_PALETTE)


# ---------------------------------------------------------------- segmentation models (mmseg)


def test_segmentation_from_toy_folder(toy_seg_dir):
    model = build_reward_model("segmentation", str(toy_seg_dir / "ade20k_seg"))
    assert model.label_format == "ade20k_palette" and model.num_classes == 150
    images = smooth_images(3, 64, 48, seed=9).requires_grad_(True)
    logits = model(images)
    assert logits.shape == (3, 150, 16, 12)  # UperNet's 1/4 grid, not upsampled
    labels = torch.randint(0, 150, (3, 64, 48))
    labels[0, :32] = 255
    labels[2] = 255  # no valid pixel: loss 0, not NaN
    loss = model.loss(logits, model.target({"labels": labels}))
    assert loss.shape == (3,) and torch.isfinite(loss).all() and loss[2] == 0
    # Independent: cross-entropy on nearest-resized labels, mean over valid pixels of sample 1.
    small = labels[1, ::4, ::4]
    expected = torch.nn.functional.cross_entropy(logits[1:2].detach(), small[None], ignore_index=255)
    torch.testing.assert_close(loss[1].detach(), expected)
    loss.sum().backward()
    assert images.grad.abs().sum() > 0 and images.grad[2].abs().sum() == 0
    prediction = model.predict(images.detach())
    assert prediction.shape == (3, 64, 48) and prediction.dtype == torch.int64
    condition = model.extract_condition(images.detach())
    assert condition.shape == (3, 3, 64, 48)
    # The condition is a palette image whose labels are the prediction again (except the shared grey).
    relabelled = ade20k_palette_to_label((condition[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    same = relabelled == prediction[0].numpy()
    assert same.mean() > 0.99


def test_segmentation_label_from_image_and_cocostuff(toy_seg_dir):
    from PIL import Image

    ade = build_reward_model("segmentation", str(toy_seg_dir / "ade20k_seg"))
    palette_image = Image.fromarray(np.array([[ADE20K_PALETTE[3], (0, 0, 0)]], dtype=np.uint8))
    np.testing.assert_array_equal(ade.label_from_image(palette_image), [[3, 255]])
    coco = build_reward_model("segmentation", str(toy_seg_dir / "cocostuff_seg"))
    assert coco.label_format == "index" and coco.num_classes == 171
    np.testing.assert_array_equal(coco.label_from_image(Image.fromarray(np.array([[7, 255]], np.uint8))), [[7, 255]])
    logits = coco(smooth_images(2, 32, 32, seed=10))
    assert logits.shape == (2, 171, 8, 8)
    with pytest.raises(ValueError, match="label_format"):
        coco.loss(logits, torch.full((2, 32, 32), 200))


def test_segmentation_checkpoint_is_loaded_strictly(toy_seg_dir, tmp_path):
    model = build_reward_model("segmentation", str(toy_seg_dir / "ade20k_seg"))
    reference = torch.load(toy_seg_dir / "ade20k_seg" / "model.pth", weights_only=False)["state_dict"]
    for key, value in model.segmentor.state_dict().items():
        assert torch.equal(value, reference[key]), key
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.py").write_text((toy_seg_dir / "cocostuff_seg" / "config.py").read_text())
    (wrong / "model.pth").write_bytes((toy_seg_dir / "ade20k_seg" / "model.pth").read_bytes())
    with pytest.raises(RuntimeError, match="does not match"):
        build_reward_model("segmentation", str(wrong))


@pytest.mark.parametrize(
    "config",
    [
        "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py",
        "mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-160k_coco-stuff164k-512x512.py",
        pytest.param("mmseg::fcn/fcn_r101-d8_4xb4-160k_ade20k-512x512.py", marks=pytest.mark.slow),
    ],
)
@needs_mmseg
def test_real_mmseg_configs_build_and_backpropagate(config):
    model = build_reward_model("segmentation", config, checkpoint="random")
    expected_classes = 171 if "coco" in config else 150
    assert model.num_classes == expected_classes
    assert model.label_format == ("index" if "coco" in config else "ade20k_palette")
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    logits = model(images)
    assert logits.shape[:2] == (1, expected_classes) and logits.shape[-1] in (8, 16)
    model.loss(logits, torch.randint(0, expected_classes, (1, 64, 64))).sum().backward()
    assert images.grad.abs().sum() > 0


@needs_mmseg
def test_mmseg_config_without_cached_checkpoint_names_the_url(tmp_path, monkeypatch):
    from reward_models.segmentation import resolve_segmentation_files

    config, url = resolve_segmentation_files("mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py", None)
    # The model zoo's published checkpoint for the paper's ADE20K reward model, written out here.
    assert url == ("https://download.openmmlab.com/mmsegmentation/v0.5/upernet/upernet_r50_512x512_160k_ade20k/"
                   "upernet_r50_512x512_160k_ade20k_20200615_184328-8534de8d.pth")
    # Not cached and no network: the error names that URL and where to put the file.
    import torch.hub

    monkeypatch.setenv("CONTROLNETPP_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(RuntimeError, match=r"(?s)" + re.escape(url) + r".*" + re.escape(str(tmp_path))):
        build_reward_model("segmentation", "mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py")


def test_depth_hub_id_offline_says_how_to_get_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError, match=r"(?s)Intel/dpt-hybrid-midas.*--local-dir DIR.*--reward_model_name_or_path"):
        build_reward_model("depth", "Intel/dpt-hybrid-midas")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward_model("depth", "./no/such/dpt-folder")
