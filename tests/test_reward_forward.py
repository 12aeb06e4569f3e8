"""The reward models' forward maths against the published annotators' formulas, written out here.

- HED (ControlNet 1.1's ``annotator/hed``): the network on the 0..255 image minus ``norm``, each
  side output resized with cv2 (INTER_LINEAR) to the image, averaged, then one sigmoid.
- Line drawing (``annotator/lineart``'s Generator): every layer by torch.nn.functional from the
  checkpoint's tensors; the ControlNet input is 1 - drawing.
- DPT: resized to its input size, normalised with mean 0.5 / std 0.5 (torchvision), the prediction
  resized back and divided by each sample's own max (numpy).
- mmseg: the input equals what mmseg's own ``SegDataPreProcessor`` makes of the uint8 BGR image
  (x255, ImageNet mean/std, BGR->RGB); ``predict`` equals ``mmseg.apis.inference_model`` (test
  pipeline resize, whole inference, logits resized back) for UperNet and for Mask2Former, the
  ADE20K evaluator's head.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_reward_models import needs_mmseg, smooth_images


# ---------------------------------------------------------------- HED


def hed_by_hand(state: dict, images: torch.Tensor) -> np.ndarray:
    """The published HEDdetector on float images: (B, H, W) float64 edge maps."""
    import cv2

    state = {k: v.double() for k, v in state.items()}
    height, width = images.shape[-2:]
    h = images.double() * 255.0 - state["norm"]
    sides = []
    for block in range(1, 6):
        if block > 1:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        k = 0
        while f"block{block}.convs.{k}.weight" in state:
            h = F.relu(F.conv2d(h, state[f"block{block}.convs.{k}.weight"], state[f"block{block}.convs.{k}.bias"],
                                padding=1))
            k += 1
        sides.append(F.conv2d(h, state[f"block{block}.projection.weight"], state[f"block{block}.projection.bias"]))
    out = []
    for i in range(images.shape[0]):
        edges = [cv2.resize(side[i, 0].numpy().astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                 for side in sides]
        edges = np.stack(edges, axis=2).astype(np.float64)
        out.append(1 / (1 + np.exp(-np.mean(edges, axis=2))))
    return np.stack(out)


@pytest.mark.parametrize("size", [(64, 48), (70, 54)])
def test_hed_is_the_sigmoid_of_the_mean_of_the_upsampled_side_outputs(size):
    from reward_models.hed import HEDRewardModel

    torch.manual_seed(0)
    model = HEDRewardModel(width=4).freeze()
    with torch.no_grad():  # the published norm is a learned colour mean; make it matter here
        model.network.norm.copy_(torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1))
    images = smooth_images(2, *size, seed=1)
    expected = hed_by_hand(model.network.state_dict(), images)
    with torch.no_grad():
        got = model(images)
    assert got.shape == (2, 1, *size)
    np.testing.assert_allclose(got[:, 0].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    # The map is not saturated, so the fusion order and the scale are visible in it.
    assert 0.05 < float(got.std()) and 0.02 < float(got.min()) and float(got.max()) < 0.98
    condition = model.extract_condition(images)
    np.testing.assert_allclose(condition.numpy(), np.repeat(expected[:, None], 3, axis=1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- line drawing


def line_drawing_by_hand(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The informative-drawings Generator(3, 1, 3) from its checkpoint keys, layer by layer."""
    s = {k: v.double() for k, v in state.items()}

    def conv(h, key, **kw):
        return F.conv2d(h, s[f"{key}.weight"], s[f"{key}.bias"], **kw)

    def deconv(h, key):
        return F.conv_transpose2d(h, s[f"{key}.weight"], s[f"{key}.bias"], stride=2, padding=1, output_padding=1)

    def norm(h):  # InstanceNorm2d defaults: no affine, no running stats, eps 1e-5
        return F.instance_norm(h, eps=1e-5)

    h = F.relu(norm(conv(F.pad(x.double(), (3, 3, 3, 3), mode="reflect"), "model0.1")))
    h = F.relu(norm(conv(h, "model1.0", stride=2, padding=1)))
    h = F.relu(norm(conv(h, "model1.3", stride=2, padding=1)))
    for r in range(3):
        key = f"model2.{r}.conv_block"
        y = F.relu(norm(conv(F.pad(h, (1, 1, 1, 1), mode="reflect"), f"{key}.1")))
        y = norm(conv(F.pad(y, (1, 1, 1, 1), mode="reflect"), f"{key}.5"))
        h = h + y
    h = F.relu(norm(deconv(h, "model3.0")))
    h = F.relu(norm(deconv(h, "model3.3")))
    return torch.sigmoid(conv(F.pad(h, (3, 3, 3, 3), mode="reflect"), "model4.1"))


def test_line_drawing_follows_the_published_generator_and_the_condition_is_inverted():
    from reward_models.lineart import LineArtRewardModel

    torch.manual_seed(1)
    model = LineArtRewardModel(ngf=4).freeze()
    images = smooth_images(2, 48, 40, seed=2)
    expected = line_drawing_by_hand(model.network.state_dict(), images)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert float(got.std()) > 1e-3  # not a constant map
    torch.testing.assert_close(model.extract_condition(images).double(), (1 - expected).repeat(1, 3, 1, 1),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- DPT


def test_dpt_input_normalisation_and_per_sample_max(toy_world):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from reward_models import build_reward_model

    model = build_reward_model("depth", str(toy_world / "reward_models" / "dpt-hybrid-midas"))
    seen = {}
    model.dpt.register_forward_pre_hook(lambda m, args, kwargs: seen.update(inputs=kwargs["pixel_values"]),
                                        with_kwargs=True)

    def other_ranges(module, args, kwargs, out):
        # The random toy DPT reads every image alike; give the second sample three times the
        # range of depths, as two real images have, so a whole-batch max would show.
        out.predicted_depth = out.predicted_depth * torch.tensor([1.0, 3.0]).view(-1, 1, 1)
        seen.update(depth=out.predicted_depth)
        return out

    model.dpt.register_forward_hook(other_ranges, with_kwargs=True)
    images = smooth_images(2, 96, 80, seed=3)
    with torch.no_grad():
        got = model(images)
    height, width = model.input_size
    resized = TF.resize(images, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(seen["inputs"], TF.normalize(resized, [0.5] * 3, [0.5] * 3), rtol=1e-5, atol=1e-5)
    depth = F.interpolate(seen["depth"][:, None].double(), size=(96, 80), mode="bilinear", align_corners=False).numpy()
    peaks = depth.reshape(2, -1).max(axis=1)
    assert abs(peaks[0] - peaks[1]) > 0.05 * peaks.max()  # per-sample vs whole-batch max would differ
    np.testing.assert_allclose(got.double().numpy(), depth / peaks[:, None, None, None], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- mmseg


def _bgr_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    """What mmseg's loaders give: HWC uint8 BGR."""
    rgb = (images01 * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(image[..., ::-1]) for image in rgb]


def _uint8_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return (smooth_images(batch, height, width, seed) * 255).round() / 255


@needs_mmseg
def test_segmentation_input_is_what_mmseg_data_preprocessor_makes(toy_world):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from reward_models import build_reward_model

    register_all_modules(init_default_scope=True)
    model = build_reward_model("segmentation", str(toy_world / "reward_models" / "ade20k_seg"))
    seen = {}
    model.segmentor.extract_feat = (lambda original: lambda x: seen.update(x=x) or original(x))(
        model.segmentor.extract_feat)
    images = _uint8_images(2, 64, 48, seed=4)
    with torch.no_grad():
        model(images)
    from mmengine.config import Config

    cfg = Config.fromfile(str(toy_world / "reward_models" / "ade20k_seg" / "config.py"))
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    inputs = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in _bgr_uint8(images)]
    expected = preprocessor({"inputs": inputs, "data_samples": None}, training=False)["inputs"]
    torch.testing.assert_close(seen["x"], expected, rtol=1e-5, atol=1e-4)
    assert float(expected.abs().max()) > 1.5  # ImageNet-normalised 0..255 values, not [0, 1] ones


def _same_resize_everywhere(cfg, scale) -> None:
    """Give the config one keep-ratio test resize (test_pipeline and test_dataloader agree)."""
    pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True),
                dict(type="PackSegInputs")]
    cfg.test_pipeline = copy.deepcopy(pipeline)
    cfg.test_dataloader = dict(dataset=dict(type=cfg.get("dataset_type", "ADE20KDataset"),
                                            pipeline=copy.deepcopy(pipeline)))
    cfg.val_dataloader = copy.deepcopy(cfg.test_dataloader)


def _predict_against_mmseg(model, cfg, images: torch.Tensor) -> float:
    """Share of pixels where ``predict`` and mmseg.apis.inference_model give the same class."""
    from mmseg.apis import inference_model

    model.segmentor.cfg = cfg
    with torch.no_grad():
        ours = model.predict(images)
        theirs = [inference_model(model.segmentor, image).pred_sem_seg.data[0] for image in _bgr_uint8(images)]
    theirs = torch.stack(theirs)
    assert ours.shape == theirs.shape == (images.shape[0], *images.shape[-2:])
    return float((ours == theirs).float().mean())


@needs_mmseg
def test_segmentation_predict_matches_mmseg_inference_model(toy_world):
    from mmengine.config import Config
    from mmseg.utils import register_all_modules

    from reward_models import build_reward_model
    from reward_models.segmentation import SegmentationRewardModel

    register_all_modules(init_default_scope=True)
    built = build_reward_model("segmentation", str(toy_world / "reward_models" / "ade20k_seg"))
    cfg = Config.fromfile(str(toy_world / "reward_models" / "ade20k_seg" / "config.py"))
    _same_resize_everywhere(cfg, (256, 128))  # 64 x 48 images are scored at 128 x 96
    model = SegmentationRewardModel(built.segmentor, cfg, "ade20k_palette").freeze()
    images = _uint8_images(2, 64, 48, seed=5)
    # cv2 resizes the uint8 image in mmseg, torch the float one here: a few boundary pixels differ
    # (a nearest resize of the logits agrees on ~90%, skipping the test resize on ~45%).
    assert _predict_against_mmseg(model, cfg, images) > 0.98


@needs_mmseg
def test_mask2former_evaluator_predict_matches_mmseg_inference_model():
    """The ADE20K evaluator is a Mask2Former (mask classification); its R50 config, random weights."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from reward_models.segmentation import SegmentationRewardModel, _drop_pretrained_init, mmseg_config_dir

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(mmseg_config_dir() / "mask2former" / "mask2former_r50_8xb2-160k_ade20k-512x512.py"))
    _drop_pretrained_init(cfg.model)
    _same_resize_everywhere(cfg, (128, 96))  # 64 x 64 images are scored at 96 x 96
    torch.manual_seed(0)
    segmentor = revert_sync_batchnorm(MODELS.build(cfg.model))
    with torch.no_grad():  # random init predicts one class everywhere; these heads give several
        for parameter in segmentor.decode_head.cls_embed.parameters():
            parameter.normal_(0, 1)
        for parameter in segmentor.decode_head.mask_embed.parameters():
            parameter.normal_(0, 2) if parameter.ndim > 1 else parameter.zero_()
    model = SegmentationRewardModel(segmentor, cfg, "ade20k_palette").freeze()
    assert model.is_mask_classification
    images = torch.zeros(1, 3, 64, 64)  # flat regions: the random network's classes follow them
    images[:, 0, :, 32:] = 1.0
    images[:, 1, 20:44, 10:50] = 1.0
    images[:, 2, 40:] = 0.8
    classes = model.predict(images)
    assert torch.bincount(classes.flatten()).max().item() < 0.99 * classes.numel()  # not one class
    # (a nearest resize of the logits agrees on 98.7% here, skipping the test resize on far less)
    assert _predict_against_mmseg(model, cfg, images) > 0.995
