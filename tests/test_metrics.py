"""utils/metrics.py against independent computations (hand counts, numpy/scipy, skimage, mmseg)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg, signal

from utils import metrics


# ------------------------------------------------------------------------------------------
# F1
# ------------------------------------------------------------------------------------------
def test_binary_f1_matches_hand_counts():
    pred = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 0]],
                         [[0, 0, 0, 0], [0, 0, 0, 0]],
                         [[1, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[1, 0, 0, 0], [0, 1, 0, 1]],
                           [[0, 0, 0, 0], [0, 0, 0, 0]],
                           [[0, 0, 0, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    # image 0: TP 2 (0,0),(1,1); FP 2 (0,1),(1,2); FN 1 (1,3) -> F1 = 4 / (4 + 2 + 1)
    # image 1: no edge anywhere -> 0 (torchmetrics' zero_division); image 2: TP 0 -> 0
    tp, fp, fn = metrics.binary_confusion_counts(pred, target)
    assert tp.tolist() == [2, 0, 0] and fp.tolist() == [2, 0, 1] and fn.tolist() == [1, 0, 1]
    assert metrics.binary_f1(pred, target).tolist() == pytest.approx([4 / 7, 0.0, 0.0])


def test_binary_f1_matches_torchmetrics_per_image():
    from torchmetrics.classification import BinaryF1Score

    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 32, 32, generator=generator) > 0.7
    target = torch.rand(5, 32, 32, generator=generator) > 0.6
    expected = [float(BinaryF1Score()(p.flatten().long(), t.flatten().long())) for p, t in zip(pred, target)]
    assert metrics.binary_f1(pred, target).tolist() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------
# SSIM / MS-SSIM / PSNR
# ------------------------------------------------------------------------------------------
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_maps(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and contrast-structure maps, Gaussian window, over the valid region (numpy)."""
    w = _gaussian_window()
    f = lambda a: signal.convolve2d(a, w, mode="valid")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs, cs


def _ssim_and_cs(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """torchmetrics' convention, which the paper's numbers come from: the images are reflect-padded
    by 5 px, the SSIM map is averaged over the whole padded-then-filtered image, the
    contrast-structure map over the valid part only."""
    ssim, _ = _ssim_maps(np.pad(x, 5, mode="reflect"), np.pad(y, 5, mode="reflect"))
    _, cs = _ssim_maps(x, y)
    return float(ssim.mean()), float(cs.mean())


def _ms_ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2003 MS-SSIM with the standard betas; 2x2 average pooling between scales."""
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    value = 1.0
    for scale, beta in enumerate(betas):
        ssim, cs = _ssim_and_cs(x, y)
        if scale == len(betas) - 1:
            value *= max(ssim, 0.0) ** beta
        else:
            value *= max(cs, 0.0) ** beta
            h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
            y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    return value


def test_numpy_ssim_reference_matches_skimage():
    """The numpy SSIM used below as the independent reference agrees with scikit-image."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.random((64, 64))
    y = np.clip(x + 0.2 * rng.standard_normal((64, 64)), 0, 1)
    expected = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert float(_ssim_maps(x, y)[0].mean()) == pytest.approx(expected, abs=1e-6)


def test_ms_ssim_matches_numpy_implementation():
    rng = np.random.default_rng(1)
    base = rng.random((192, 192))
    # smooth structure so every scale has signal, plus noise of two strengths
    base = signal.convolve2d(base, np.ones((5, 5)) / 25, mode="same")
    pred = np.stack([np.clip(base + s * rng.standard_normal(base.shape), 0, 1) for s in (0.05, 0.2)])
    target = np.stack([base, base])
    ours = metrics.ms_ssim(torch.from_numpy(pred)[:, None].float(), torch.from_numpy(target)[:, None].float())
    expected = [_ms_ssim_numpy(p, t) for p, t in zip(pred, target)]
    assert ours.tolist() == pytest.approx(expected, abs=2e-4)
    assert ours[0] > ours[1]  # more noise, less similar


def test_ms_ssim_refuses_small_images():
    with pytest.raises(ValueError, match="192"):
        metrics.ms_ssim(torch.rand(1, 1, 160, 160), torch.rand(1, 1, 160, 160))
    with pytest.raises(ValueError, match="H // 16 > 10"):  # torchmetrics refuses 161..175 px too
        metrics.ms_ssim(torch.rand(1, 1, 168, 200), torch.rand(1, 1, 168, 200), crop_ssim_border=True)
    assert torch.isfinite(metrics.ms_ssim(torch.rand(1, 1, 176, 176), torch.rand(1, 1, 176, 176),
                                          crop_ssim_border=True)).all()


def test_psnr_by_hand():
    target = torch.full((2, 1, 8, 8), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    assert metrics.psnr(pred, target).tolist() == pytest.approx([20.0, metrics.PSNR_CAP_DB])
    # pooled: MSE (0.01 + 0) / 2 -> 10 log10(200)
    assert float(metrics.psnr_pooled(pred, target)) == pytest.approx(10 * np.log10(200))


def test_lineart_reference_inversion_wraps_like_uint8():
    drawing = torch.tensor([0, 1, 2, 128, 254, 255], dtype=torch.uint8)
    # 1 - x modulo 256, as numpy computes it on uint8
    expected = (np.uint8(1) - drawing.numpy()).astype(np.float64) / 255
    assert expected.tolist()[:3] == pytest.approx([1 / 255, 0.0, 1.0])
    assert metrics.lineart_reference_inversion(drawing).tolist() == pytest.approx(expected.tolist())


# ------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------
def test_depth_normalisations_and_rmse_by_hand():
    label = torch.tensor([[[0.2, 0.4], [0.6, 1.0]]])          # min 0.2, max 1.0
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert metrics.min_max_normalize(label)[0].flatten().tolist() == pytest.approx([0, 0.25, 0.5, 1.0])
    assert metrics.max_normalize(pred)[0].flatten().tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert metrics.min_max_normalize(torch.zeros(1, 2, 2)).abs().max() == 0  # constant map -> 0, no NaN
    # RMSE of (0.25,0.5,0.75,1) vs (0,0.25,0.5,1) on 0..255: sqrt((3 * 0.25^2) / 4) * 255
    value = metrics.rmse(metrics.max_normalize(pred) * 255, metrics.min_max_normalize(label) * 255)
    assert float(value) == pytest.approx(np.sqrt(3 * 0.25 ** 2 / 4) * 255)


def test_grouped_mean():
    means = metrics.GroupedMean(2)
    means.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 0]))
    means.update(np.array([4.0]), np.array([1]))
    assert means.per_group() == [2.0, 3.0] and means.mean() == 2.5


# ------------------------------------------------------------------------------------------
# mIoU
# ------------------------------------------------------------------------------------------
def _miou_numpy(preds, labels, num_classes, ignore=255) -> float:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, l in zip(preds, labels):
        valid = l != ignore
        np.add.at(confusion, (l[valid], p[valid]), 1)
    intersection = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(intersection / union) * 100)


@pytest.fixture()
def seg_pair():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 16, 16))
    labels[:, :2] = 255  # ignored rows
    preds = np.where(rng.random(labels.shape) < 0.7, np.clip(labels, 0, 5), rng.integers(0, 6, size=labels.shape))
    preds[preds == 255] = 0
    return preds, labels


def test_miou_matches_numpy_confusion_and_mmseg_iou_metric(seg_pair):
    pytest.importorskip("mmcv.ops", reason="mmseg's IoUMetric needs mmcv (its package import requires it)")
    from mmseg.evaluation.metrics import IoUMetric

    preds, labels = seg_pair
    num_classes = 6  # class 5 is predicted but never labelled: IoU 0, counted
    areas = metrics.SegmentationAreas(num_classes, num_groups=2)
    areas.update(torch.from_numpy(preds), torch.from_numpy(labels), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert areas.miou() == pytest.approx(_miou_numpy(preds, labels, num_classes), abs=1e-9)
    assert areas.per_group()[1] == pytest.approx(_miou_numpy(preds[1::2], labels[1::2], num_classes), abs=1e-9)

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [str(c) for c in range(num_classes)]}
    samples = [{"pred_sem_seg": {"data": torch.from_numpy(p)[None]}, "gt_sem_seg": {"data": torch.from_numpy(l)[None]}}
               for p, l in zip(preds, labels)]
    metric.process({}, samples)
    assert metric.compute_metrics(metric.results)["mIoU"] == pytest.approx(areas.miou(), abs=0.006)  # mmseg rounds


# ------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------
def test_gaussian_stats_and_frechet_distance_match_numpy_scipy():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 8))
    fake = 0.8 * rng.standard_normal((200, 8)) + 0.3
    real_stats, fake_stats = metrics.GaussianStats(), metrics.GaussianStats()
    for chunk in np.array_split(real, 7):
        real_stats.update(chunk)
    for chunk in np.array_split(fake, 3):
        fake_stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(real_stats.mean(), real.mean(0), atol=1e-12)
    np.testing.assert_allclose(real_stats.cov(), np.cov(real, rowvar=False), atol=1e-10)
    mu1, s1, mu2, s2 = fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(real_stats, fake_stats) == pytest.approx(expected, rel=1e-6)
