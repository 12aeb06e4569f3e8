"""Evaluation metrics of ControlNet++ (paper Sec. 4.1), as pure batched functions.

Every function takes a batch and returns one value per image (shape (B,)), so the evaluation
scripts stream over tens of thousands of images with constant memory: per-image values go into
a ``GroupedMean`` (sums and counts per generation group), segmentation areas into a
``SegmentationAreas``, Inception features into ``GaussianStats`` (sum and sum of outer
products). Nothing keeps a list of images.

Conventions: images are float tensors in [0, 1] unless a name says ``_255`` (0..255 scale) or
``_uint8``. The functions run on whatever device their inputs are on.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# The original release replaced an infinite PSNR (identical images) by 100 dB before averaging;
# without a cap a single identical pair makes the mean infinite.
PSNR_CAP_DB = 100.0
# torchmetrics' MS-SSIM (5 scales, kernel 11) refuses images with H // 16 <= 10, i.e. up to 175 px:
# its coarsest scale must hold an 11 x 11 window (and the paper protocol's border crop must leave
# something of it: at 161..175 px it would leave an empty map, a NaN).
MS_SSIM_MIN_SIZE = 175


# --------------------------------------------------------------------------------------------
# Per-image streaming means
# --------------------------------------------------------------------------------------------
class GroupedMean:
    """Running sum and count of per-image values, per generation group (float64, O(groups))."""

    def __init__(self, num_groups: int):
        self.sums = np.zeros(num_groups, dtype=np.float64)
        self.counts = np.zeros(num_groups, dtype=np.int64)

    def update(self, values: torch.Tensor | np.ndarray, groups: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(torch.as_tensor(values).detach().double().cpu())
        groups = np.asarray(torch.as_tensor(groups).cpu(), dtype=np.int64)
        np.add.at(self.sums, groups, values)
        np.add.at(self.counts, groups, 1)

    def per_group(self) -> list[float]:
        return [float(s / c) if c else float("nan") for s, c in zip(self.sums, self.counts)]

    def mean(self) -> float:
        """Mean over every scored image (all groups pooled; equal to the mean of the group means
        when the groups have the same number of images, as they do in a complete run)."""
        total = self.counts.sum()
        return float(self.sums.sum() / total) if total else float("nan")


# --------------------------------------------------------------------------------------------
# Edges: F1 on binary maps, MS-SSIM, PSNR
# --------------------------------------------------------------------------------------------
def binary_confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """True positives, false positives, false negatives per image (each (B,), int64).

    ``pred`` and ``target`` are boolean (B, ...) edge maps.
    """
    pred = pred.flatten(1).bool()
    target = target.flatten(1).bool()
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return tp, fp, fn


def f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """F1 = 2TP / (2TP + FP + FN); 0 when there is no edge in either map (torchmetrics'
    ``zero_division=0``, which the original's BinaryF1Score used)."""
    tp, fp, fn = (x.double() for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))


def f1_from_counts_float32(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """F1 from integer counts in torchmetrics' ``BinaryF1Score`` arithmetic (float32 2TP / (2TP + FN + FP),
    0 when the denominator is 0), as the original's evaluation computed it (the paper protocol)."""
    numerator = 2.0 * tp
    denominator = 2.0 * tp + fn + fp
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.zeros_like(numerator)).double()


def binary_f1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F1 score per image (B,) of boolean edge maps."""
    return f1_from_counts(*binary_confusion_counts(pred, target))


MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, torchmetrics' default
SSIM_KERNEL_SIZE, SSIM_SIGMA = 11, 1.5


def _gaussian_kernel_2d(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchmetrics' Gaussian window, built the same way (outer product of the normalised 1-D kernel)."""
    distance = torch.arange(start=(1 - SSIM_KERNEL_SIZE) / 2, end=(1 + SSIM_KERNEL_SIZE) / 2, step=1, dtype=dtype,
                            device=device)
    gauss = torch.exp(-torch.pow(distance / SSIM_SIGMA, 2) / 2)
    gauss = (gauss / gauss.sum()).unsqueeze(dim=0)  # (1, k)
    return torch.matmul(gauss.t(), gauss).expand(channels, 1, SSIM_KERNEL_SIZE, SSIM_KERNEL_SIZE)


def _ssim_and_contrast_structure(pred: torch.Tensor, target: torch.Tensor, crop_ssim_border: bool = False):
    """Per-image SSIM and contrast-structure means (each (B,)), torchmetrics' ``_ssim_update`` step for
    step (the same operations in the same order, so the values agree to the last bit on one device):
    reflect padding by half the window, one grouped 2-D convolution of the five maps, variances
    clamped at 0, the contrast-structure map averaged without the padded border. The SSIM map is
    averaged over the whole image (torchmetrics >= 1.4.2) or, with ``crop_ssim_border``, without
    the border too (torchmetrics <= 1.4.1, what the paper's 2024 evaluation ran)."""
    c1, c2 = pow(0.01 * 1.0, 2), pow(0.03 * 1.0, 2)  # k1, k2 times the data range 1
    pad = (SSIM_KERNEL_SIZE - 1) // 2
    channels, dtype = pred.size(1), pred.dtype
    kernel = _gaussian_kernel_2d(channels, dtype, pred.device)
    pred = F.pad(pred, (pad, pad, pad, pad), mode="reflect")
    target = F.pad(target, (pad, pad, pad, pad), mode="reflect")
    stacked = torch.cat((pred, target, pred * pred, target * target, pred * target))
    outputs = F.conv2d(stacked, kernel, groups=channels).split(pred.shape[0])
    mu_pred_sq, mu_target_sq = outputs[0].pow(2), outputs[1].pow(2)
    mu_pred_target = outputs[0] * outputs[1]
    sigma_pred_sq = torch.clamp(outputs[2] - mu_pred_sq, min=0.0)
    sigma_target_sq = torch.clamp(outputs[3] - mu_target_sq, min=0.0)
    sigma_pred_target = outputs[4] - mu_pred_target
    upper = 2 * sigma_pred_target.to(dtype) + c2
    lower = (sigma_pred_sq + sigma_target_sq).to(dtype) + c2
    ssim_map = ((2 * mu_pred_target + c1) * upper) / ((mu_pred_sq + mu_target_sq + c1) * lower)
    if crop_ssim_border:
        ssim_map = ssim_map[..., pad:-pad, pad:-pad]
    contrast_structure = (upper / lower)[..., pad:-pad, pad:-pad]
    return (ssim_map.reshape(ssim_map.shape[0], -1).mean(-1),
            contrast_structure.reshape(contrast_structure.shape[0], -1).mean(-1))


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, crop_ssim_border: bool = False) -> torch.Tensor:
    """Multi-scale SSIM per image (B,) of (B,C,H,W) maps in [0, 1].

    The paper's settings, torchmetrics' ``multiscale_structural_similarity_index_measure``
    defaults, which the original release called: data range 1, Gaussian kernel 11 (sigma 1.5),
    5 scales with the standard betas, negative terms clipped to 0 ("relu"); 2x2 average pooling
    between scales. Needs H, W >= 176, as torchmetrics (H // 16 > 10).
    ``crop_ssim_border=True`` is torchmetrics <= 1.4.1's definition (the paper protocol): the
    coarsest scale's SSIM map is averaged without its 5-pixel border; False is torchmetrics >= 1.4.2.
    The arithmetic is torchmetrics' own, so the values equal its (the float rounding of a
    convolution can still depend on the batch: the original scored each prompt's images together).
    """
    if min(pred.shape[-2:]) <= MS_SSIM_MIN_SIZE:
        raise ValueError(
            f"MS-SSIM with 5 scales and an 11x11 kernel needs images larger than {MS_SSIM_MIN_SIZE} px, got "
            f"{tuple(pred.shape[-2:])} (torchmetrics requires H // 16 > 10); generate at --resolution 192 or more "
            "for hed/lineart."
        )
    pred, target = pred.float(), target.float()
    terms = []
    for _ in MS_SSIM_BETAS:
        ssim, contrast_structure = _ssim_and_contrast_structure(pred, target, crop_ssim_border)
        terms.append(torch.relu(contrast_structure))
        pred, target = F.avg_pool2d(pred, (2, 2)), F.avg_pool2d(target, (2, 2))
    terms[-1] = torch.relu(ssim)  # the coarsest scale contributes its full SSIM
    betas = torch.tensor(MS_SSIM_BETAS, device=pred.device).view(-1, 1)
    return torch.prod(torch.stack(terms) ** betas, dim=0)


def psnr(pred: torch.Tensor, target: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """PSNR per image (B,) in dB of maps in [0, 1] (data range 1), capped at ``cap_db``."""
    mse = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    value = 10 * torch.log10(1.0 / mse)  # inf where mse == 0
    return value.clamp(max=cap_db)


def psnr_pooled(pred: torch.Tensor, target: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """One PSNR over the whole batch (the squared errors pooled), as torchmetrics'
    ``PeakSignalNoiseRatio(data_range=1.0)`` returns for a batch, in its float32 arithmetic: the
    original scored each prompt's 4 images so (the paper protocol), capping inf at 100 dB."""
    sum_squared_error = torch.sum(torch.pow(pred.float() - target.float(), 2))
    num_obs = torch.tensor(target.numel(), device=target.device)
    data_range = torch.tensor(1.0, device=target.device)
    value = (2 * torch.log(data_range) - torch.log(sum_squared_error / num_obs)) * (10 / torch.log(torch.tensor(10.0)))
    return value.clamp(max=cap_db).double()


def lineart_reference_inversion(pred_uint8: torch.Tensor) -> torch.Tensor:
    """The original release's lineart scoring input (defect 2), reproduced for the paper protocol.

    The original read the un-inverted line drawing of the generated image (0 = ink) as a uint8
    tensor and computed ``1 - x`` on it before dividing by 255. On uint8 that wraps around:
    0 -> 1, 1 -> 0, 2 -> 255, ..., 255 -> 2, instead of 255 - x. Returns the wrapped values / 255
    clipped to [0, 1], exactly what its MS-SSIM saw.
    """
    if pred_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 line drawing, got {pred_uint8.dtype}")
    wrapped = 1 - pred_uint8  # uint8 arithmetic: wraps modulo 256, as in the original
    return (wrapped.float() / 255.0).clip(0, 1)


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------
def min_max_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map each sample of a (B, ...) tensor to [0, 1] by its own min and max (a constant map -> 0)."""
    flat = x.double().flatten(1)
    low = flat.amin(1, keepdim=True)
    span = (flat.amax(1, keepdim=True) - low).clamp_min(eps)
    return ((flat - low) / span).view(x.shape)


def max_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divide each sample of a (B, ...) tensor by its own max (an all-zero map stays 0)."""
    flat = x.double().flatten(1)
    return (flat / flat.amax(1, keepdim=True).clamp_min(eps)).view(x.shape)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per image (B,) over all but the first dim."""
    return ((pred.double() - target.double()) ** 2).flatten(1).mean(1).sqrt()


# --------------------------------------------------------------------------------------------
# Segmentation: mIoU through mmseg's IoUMetric
# --------------------------------------------------------------------------------------------
class SegmentationAreas:
    """Per-class intersection / union / prediction / label areas, summed per group.

    The areas of each image come from mmseg's ``IoUMetric.intersect_and_union`` and the score
    from ``IoUMetric.total_area_to_metrics`` (the functions ``mim test mmseg`` ran in the
    original), but the sums are kept here so memory does not grow with the number of images.
    """

    def __init__(self, num_classes: int, num_groups: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # areas[g] = (intersect, union, pred, label), each (num_classes,) float64
        self.areas = np.zeros((num_groups, 4, num_classes), dtype=np.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor, groups) -> None:
        """pred, label: (B, H, W) integer maps; groups: (B,) group index of each image."""
        from mmseg.evaluation.metrics import IoUMetric

        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
        for p, l, g in zip(pred, label, torch.as_tensor(groups).tolist()):
            areas = IoUMetric.intersect_and_union(p, l.to(p.device), self.num_classes, self.ignore_index)
            self.areas[g] += np.stack([a.double().numpy() for a in areas])

    def miou(self, groups: list[int] | None = None) -> float:
        """mIoU in percent over the given groups pooled (all by default): classes absent from
        both prediction and label are skipped (NaN IoU, mmseg's ``nanmean``)."""
        from mmseg.evaluation.metrics import IoUMetric

        total = self.areas[groups if groups is not None else slice(None)].reshape(-1, 4, self.num_classes).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            metrics = IoUMetric.total_area_to_metrics(*(torch.from_numpy(a) for a in total), metrics=["mIoU"])
        return float(np.nanmean(metrics["IoU"]) * 100)

    def per_group(self) -> list[float]:
        return [self.miou([g]) for g in range(len(self.areas))]


# --------------------------------------------------------------------------------------------
# FID: streaming Gaussian statistics of features
# --------------------------------------------------------------------------------------------
class GaussianStats:
    """Mean and covariance of feature vectors, accumulated in float64 without storing them.

    ``cov()`` equals ``np.cov(features, rowvar=False)`` (unbiased), what clean-fid computes from
    its stacked feature matrix.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        features = np.asarray(torch.as_tensor(features).detach().cpu().double())
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (B, D), got {features.shape}")
        if self.sum is None:
            self.sum = np.zeros(features.shape[1])
            self.outer = np.zeros((features.shape[1], features.shape[1]))
        self.n += len(features)
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mean = self.mean()
        return (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


def frechet_distance(real: GaussianStats, fake: GaussianStats) -> float:
    """FID between two feature distributions, with clean-fid's own Fréchet distance."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    return float(cleanfid_frechet_distance(fake.mean(), fake.cov(), real.mean(), real.cov()))
