"""The paper protocol's metric definitions against the libraries the original ran (docs/FIDELITY.md).

- MS-SSIM: ours with the border crop equals torchmetrics 1.4.1 itself (the 2024 definition), ours
  without it equals the installed torchmetrics (>= 1.4.2), and the two differ;
- stored maps: HED's double truncation, the line drawing's two quantisations, the depth label,
  each worked out by hand from the original's formulas (numpy / PIL / torchvision);
- segmentation: the paper protocol's mmseg path at the (2048, 512) keep-ratio scale equals
  mmseg's own ``inference_model`` with that scale.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference_libs import ms_ssim_torchmetrics_2024


def _maps(seed: int, shape=(3, 1, 192, 200)) -> tuple[np.ndarray, np.ndarray]:
    """Edge-like maps in [0, 1] (blurred blocks plus noise) and a perturbed copy."""
    rng = np.random.default_rng(seed)
    base = rng.random((shape[0], shape[1], shape[2] // 8, shape[3] // 8)).repeat(8, -2).repeat(8, -1)
    base = np.clip(base + rng.normal(0, 0.05, shape), 0, 1)
    other = np.clip(base + rng.normal(0, 0.15, shape), 0, 1)
    return base.astype(np.float32), other.astype(np.float32)


def test_paper_ms_ssim_is_torchmetrics_2024_and_corrected_is_todays():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    from utils import metrics

    pred, target = _maps(0)
    paper = metrics.ms_ssim(torch.from_numpy(pred), torch.from_numpy(target), crop_ssim_border=True)
    corrected = metrics.ms_ssim(torch.from_numpy(pred), torch.from_numpy(target), crop_ssim_border=False)
    expected_2024 = ms_ssim_torchmetrics_2024(pred, target)
    expected_today = multiscale_structural_similarity_index_measure(
        torch.from_numpy(pred), torch.from_numpy(target), data_range=1.0, reduction="none")
    assert paper.tolist() == pytest.approx(expected_2024, abs=1e-7)  # the same arithmetic as torchmetrics
    assert corrected.tolist() == pytest.approx(expected_today.tolist(), abs=1e-7)
    assert (paper - corrected).abs().min() > 2e-5  # the two definitions are told apart


def test_paper_psnr_and_f1_are_torchmetrics_float32_arithmetic():
    from torchmetrics.classification import BinaryF1Score
    from torchmetrics.image import PeakSignalNoiseRatio

    from utils import metrics

    pred, target = (torch.from_numpy(x) for x in _maps(5, (4, 1, 64, 64)))
    expected = PeakSignalNoiseRatio(data_range=1.0)(pred, target)  # the original's object, one prompt's batch
    assert float(metrics.psnr_pooled(pred, target)) == float(expected)
    edges, reference_edges = pred > 0.6, target > 0.55
    counts = metrics.binary_confusion_counts(edges.flatten()[None], reference_edges.flatten()[None])
    f1 = BinaryF1Score()(edges.flatten().to(torch.uint8), reference_edges.flatten().to(torch.uint8))
    assert float(metrics.f1_from_counts_float32(*counts)[0]) == float(f1)


def test_lineart_paper_inversion_wraps_around_as_uint8():
    from utils import metrics

    stored_raw = torch.tensor([0, 1, 2, 128, 255], dtype=torch.uint8)  # the original's un-inverted drawing
    expected = np.array([1, 0, 255, 129, 2], dtype=np.float32) / 255  # numpy uint8: 1 - x modulo 256
    assert np.array_equal((np.uint8(1) - stored_raw.numpy()).astype(np.float32) / 255, expected)
    np.testing.assert_array_equal(metrics.lineart_reference_inversion(stored_raw).numpy(), expected)


def test_hed_stored_map_is_the_originals_double_truncation(toy_world):
    from reward_models import build_reward_model

    model = build_reward_model("hed", str(toy_world / "reward_models" / "ControlNetHED.pth"))
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = model(images)[:, 0].numpy()
    # The original's HEDdetector: (p * 255).clip(0, 255) -> uint8 -> / 255.0; then to_pil_image: * 255 -> byte.
    levels = np.clip(p * np.float32(255.0), 0, 255).astype(np.uint8)
    expected = ((levels / np.float32(255.0)).astype(np.float32) * np.float32(255)).astype(np.uint8)
    stored = model.condition_uint8(images)
    assert stored.dtype == torch.uint8 and stored.shape == (2, 3, 40, 48)
    # ours fuses with the original's 1 / (1 + exp(-mean)); p here is torch.sigmoid: the last bit may differ
    difference = np.abs(stored[:, 0].numpy().astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert (expected != np.round(p * 255)).any()  # truncation, not rounding


def test_lineart_stored_maps_are_the_originals_two_quantisations(toy_world):
    from reward_models import build_reward_model

    model = build_reward_model("lineart", str(toy_world / "reward_models" / "lineart" / "model.pth"))
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        drawing = model(images)[:, 0].numpy()
    label = ((np.float32(1) - drawing) * np.float32(255)).astype(np.uint8)  # eval.py: 1 - x in float, to_pil_image
    generated_raw = (drawing * np.float32(255)).astype(np.uint8)  # eval.py: the generated drawing, un-inverted
    np.testing.assert_array_equal(model.condition_uint8(images)[:, 0].numpy(), label)
    np.testing.assert_array_equal(255 - model.extracted_uint8(images)[:, 0].numpy(), generated_raw)


def test_depth_label_is_the_originals_full_size_min_max():
    from reward_models.depth import depth_label

    rng = np.random.default_rng(2)
    depth = (rng.random((50, 70)) * 3000 + 500).astype(np.uint16)  # a 16-bit, non-square depth map
    label = Image.fromarray(depth)
    # The original: np.array -> (x - min) / (max - min) * 255 -> astype(uint8) -> fromarray -> nearest resize.
    array = np.array(label)
    normalised = ((array - array.min()) / (array.max() - array.min()) * 255).astype("uint8")
    expected = np.asarray(Image.fromarray(normalised).resize((32, 32), Image.NEAREST).convert("L"))
    np.testing.assert_array_equal(depth_label(label, 32), expected)
    flat = Image.fromarray(np.full((8, 8), 7, np.uint8))
    assert not depth_label(flat, 4).any()  # a flat map: 0, not the original's NaN


def test_depth_paper_maps_are_to_pil_image_then_pil_bilinear():
    import torchvision.transforms.functional as TF

    from eval.eval_depth import paper_depth_maps

    predicted = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(3)) * 7 + 1
    maps = paper_depth_maps(predicted, (40, 32))  # (W, H): a non-square map keeps its orientation
    assert maps.shape == (2, 32, 40)
    for depth, ours in zip(predicted, maps):
        image = TF.to_pil_image(depth / depth.max())  # the original's call
        expected = np.asarray(image.convert("RGB").resize((40, 32), Image.BILINEAR).convert("L"))
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_segmentation_paper_scale_is_mmsegs_inference_at_2048_512(toy_world):
    pytest.importorskip("mmcv.ops", reason="mmseg segmenters need mmcv's compiled ops")
    from mmengine.config import Config
    from mmseg.apis import inference_model

    from eval.eval_seg import PAPER_TEST_SCALE
    from reward_models import build_reward_model

    folder = toy_world / "reward_models" / "ade20k_seg"
    model = build_reward_model("segmentation", str(folder))
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    paper = model.predict_mmseg(images, test_scale=PAPER_TEST_SCALE)
    own = model.predict_mmseg(images)

    cfg = Config.fromfile(str(folder / "config.py"))
    for step in cfg.test_pipeline:
        if step["type"] == "Resize":
            step["scale"] = PAPER_TEST_SCALE  # what the original's test dataloader used
    model.segmentor.cfg = cfg
    expected = [inference_model(model.segmentor, np.ascontiguousarray(image[..., ::-1])).pred_sem_seg.data[0]
                for image in images]  # mmseg reads BGR
    assert torch.equal(paper, torch.stack(expected).long().cpu())
    assert paper.shape == (2, 64, 64)
    assert not torch.equal(paper, own)  # 64 px: segmented at 512 by the paper protocol, at 64 by the config
