"""Toy reward-model checkpoints: tiny, randomly initialised, in the published formats.

``write_toy_reward_models(out_dir, seed)`` writes one small checkpoint per reward model so that
training, evaluation and the tests run the real loading code on CPU in seconds:

    ControlNetHED.pth            plain state dict, published HED keys, width 4 instead of 64
    lineart/model.pth            plain state dict, published line-drawing keys, ngf 4 instead of 64
    dpt-hybrid-midas/            DPTForDepthEstimation.save_pretrained (safetensors) + preprocessor_config.json
    dpt-large/                   the evaluation depth model: the same format, a wider and deeper ViT (the
                                 paper scores depth with DPT-Large, not with the DPT-Hybrid it rewards with)
    ade20k_seg/config.py, model.pth      mmseg UperNet on a narrow ResNet-18, 150 classes, ADE20K
    cocostuff_seg/config.py, model.pth   the same with 171 classes, COCO-Stuff
    ade20k_seg_eval/, cocostuff_seg_eval/   the evaluation segmenters: DeepLabV3+ on a wider, dilated
                                         ResNet-18 (another architecture than the rewards', as the
                                         paper scores segmentation with other networks than it rewards)

The same seed gives the same bytes. The toy DPT is a plain (non-hybrid) ViT backbone: the
hybrid one needs a BiT ResNet whose smallest configuration is still far from tiny, and the
reward code treats both the same way (``DPTForDepthEstimation`` with ``predicted_depth``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from reward_models.hed import HEDNetwork
from reward_models.lineart import LineDrawingNetwork

TOY_WIDTH = 4  # HED base width and line-drawing ngf of the toy checkpoints (published: 64)
TOY_DPT_SIZE = 64  # DPT input resolution of the toy depth model (published: 384)
# The keys of write_toy_reward_models' result; a world whose manifest lacks one is an older world.
REWARD_MODEL_KEYS = ("hed", "lineart", "depth", "segmentation_ade20k", "segmentation_cocostuff",
                     "segmentation_ade20k_eval", "segmentation_cocostuff_eval", "depth_eval")
# The toy DPTs: the reward's (as small as a working DPT gets) and the evaluation's, wider and deeper,
# as DPT-Large (ViT-L/16) is beside DPT-Hybrid (ViT-B/16 on a ResNet-50 stem).
_TOY_DPT_SIZES = {
    "hybrid": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                   neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16),
    "large": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                  neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32),
}

# A tiny mmseg EncoderDecoder: UperNet on a ResNetV1c-18 with 8 base channels (the rewards), or
# DeepLabV3+ on a dilated ResNetV1c-18 with 16 base channels (the evaluation segmenters). The
# keep-ratio test resize keeps 64 px toy images at 64 px (the real ADE20K configs resize to 512).
_TOY_SEG_CONFIG = """\
# Toy {dataset} {role} written by toy/reward_checkpoints.py: random weights, for tests only.
dataset_type = '{dataset_type}'
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ResNetV1c',
        depth=18,
{backbone}        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True),
    decode_head=dict(
{decode_head}        dropout_ratio=0.1,
        num_classes={num_classes},
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label={reduce_zero_label}),
    dict(type='PackSegInputs'),
]
"""
_TOY_SEG_ARCHITECTURES = {
    # The reward segmenters: UperNet (the paper's ADE20K reward is UperNet-R50), output stride 32
    # with the four stages fused.
    "upernet": ("segmenter", """\
        stem_channels=8,
        base_channels=8,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
""", """\
        type='UPerHead',
        in_channels=[8, 16, 32, 64],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=16,
"""),
    # The evaluation segmenters: DeepLabV3+ (the paper scores COCO-Stuff with a DeepLabV3), output
    # stride 8 (dilated last two stages), ASPP with dilations scaled to 64 px inputs, the first
    # stage's features fused back in, twice the reward's width.
    "deeplabv3plus": ("evaluation segmenter", """\
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
""", """\
        type='DepthwiseSeparableASPPHead',
        in_channels=128,
        in_index=3,
        channels=32,
        dilations=(1, 2, 4, 6),
        c1_in_channels=16,
        c1_channels=8,
"""),
}


def _save_state_dict(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.contiguous() for key, value in module.state_dict().items()}, path)


def write_toy_hed(path: Path, seed: int) -> None:
    """A ControlNetHED.pth with the published keys and width TOY_WIDTH."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_state_dict(HEDNetwork(width=TOY_WIDTH), Path(path))


def write_toy_lineart(path: Path, seed: int) -> None:
    """A line-drawing model.pth with the published keys and ngf TOY_WIDTH."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_state_dict(LineDrawingNetwork(ngf=TOY_WIDTH), Path(path))


def write_toy_dpt(folder: Path, seed: int, size: str = "hybrid") -> None:
    """A tiny DPTForDepthEstimation folder (safetensors) with a 64 px preprocessor_config.json;
    ``size``: ``hybrid`` (the reward) or ``large`` (the evaluation), see _TOY_DPT_SIZES."""
    from transformers import DPTConfig, DPTForDepthEstimation

    if size not in _TOY_DPT_SIZES:
        raise ValueError(f"toy DPT sizes are {sorted(_TOY_DPT_SIZES)}, not {size!r}")
    folder = Path(folder)
    config = DPTConfig(
        **_TOY_DPT_SIZES[size],
        image_size=TOY_DPT_SIZE,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
        is_hybrid=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config)
        # transformers initialises DPT's convolutions with std 0.02, so in a 4-layer toy the
        # neck's features are ~1e-7 and the final ReLU outputs 0 everywhere: the toy depth
        # reward would have no signal. Use PyTorch's default conv init instead and make the
        # last conv output positive with some spatial variation (a relative-depth-like map).
        convs = [m for m in [*model.neck.modules(), *model.head.modules()] if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        for conv in convs:
            conv.reset_parameters()
        torch.nn.init.normal_(convs[-1].weight, std=1.0)
        torch.nn.init.constant_(convs[-1].bias, 1.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    # The reward model reads its input size here, as DPTImageProcessor would.
    preprocessor = {
        "image_processor_type": "DPTImageProcessor",
        "do_resize": True,
        "size": {"height": TOY_DPT_SIZE, "width": TOY_DPT_SIZE},
        "keep_aspect_ratio": False,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def write_toy_segmenter(folder: Path, seed: int, dataset_type: str = "ADE20KDataset",
                        architecture: str = "upernet") -> None:
    """config.py + model.pth (mmengine format) of a tiny segmenter for ADE20K (150) or COCO-Stuff (171)
    classes; ``architecture``: ``upernet`` (the rewards) or ``deeplabv3plus`` (the evaluation)."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from reward_models.palettes import ADE20K_PALETTE, COCO_STUFF_PALETTE

    datasets = {"ADE20KDataset": ("ADE20K", 150), "COCOStuffDataset": ("COCO-Stuff", 171)}
    if dataset_type not in datasets:
        raise ValueError(f"toy segmenters exist for {sorted(datasets)}, not {dataset_type!r}")
    if architecture not in _TOY_SEG_ARCHITECTURES:
        raise ValueError(f"toy segmenter architectures are {sorted(_TOY_SEG_ARCHITECTURES)}, not {architecture!r}")
    role, backbone, decode_head = _TOY_SEG_ARCHITECTURES[architecture]
    dataset, num_classes = datasets[dataset_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_text = _TOY_SEG_CONFIG.format(
        dataset=dataset, role=role, dataset_type=dataset_type, backbone=backbone,
        decode_head=decode_head, num_classes=num_classes, reduce_zero_label=dataset_type == "ADE20KDataset"
    )
    (folder / "config.py").write_text(config_text)
    register_all_modules(init_default_scope=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        segmentor = MODELS.build(Config.fromfile(str(folder / "config.py")).model)
    # mmengine's checkpoint layout, with numpy objects in `meta` like the model-zoo files, so
    # that loading exercises the numpy allow-list of base.load_state_dict_file.
    palette = ADE20K_PALETTE if num_classes == len(ADE20K_PALETTE) else COCO_STUFF_PALETTE
    checkpoint = {
        "meta": {
            "mmseg_version": "toy",
            "seed": np.int64(seed),
            "dataset_meta": {"classes": tuple(f"class{i}" for i in range(num_classes)), "palette": np.array(palette, dtype=np.uint8)},
        },
        "state_dict": {key: value.contiguous() for key, value in segmentor.state_dict().items()},
    }
    torch.save(checkpoint, folder / "model.pth")


def write_toy_reward_models(out_dir: Path, seed: int) -> dict[str, str]:
    """Write the toy checkpoints under ``out_dir``; return {task or name: path}.

    Keys: ``hed``, ``lineart``, ``depth``, ``segmentation_ade20k``, ``segmentation_cocostuff`` (the
    rewards), ``segmentation_ade20k_eval``, ``segmentation_cocostuff_eval`` (the evaluation
    segmenters) and ``depth_eval`` (the evaluation depth model).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "hed": out_dir / "ControlNetHED.pth",
        "lineart": out_dir / "lineart" / "model.pth",
        "depth": out_dir / "dpt-hybrid-midas",
        "segmentation_ade20k": out_dir / "ade20k_seg",
        "segmentation_cocostuff": out_dir / "cocostuff_seg",
        "segmentation_ade20k_eval": out_dir / "ade20k_seg_eval",
        "segmentation_cocostuff_eval": out_dir / "cocostuff_seg_eval",
        "depth_eval": out_dir / "dpt-large",
    }
    # A different seed per model, so that no two toy networks share their initial weights.
    write_toy_hed(paths["hed"], seed)
    write_toy_lineart(paths["lineart"], seed + 1)
    write_toy_dpt(paths["depth"], seed + 2)
    write_toy_segmenter(paths["segmentation_ade20k"], seed + 3, "ADE20KDataset")
    write_toy_segmenter(paths["segmentation_cocostuff"], seed + 4, "COCOStuffDataset")
    write_toy_segmenter(paths["segmentation_ade20k_eval"], seed + 5, "ADE20KDataset", "deeplabv3plus")
    write_toy_segmenter(paths["segmentation_cocostuff_eval"], seed + 6, "COCOStuffDataset", "deeplabv3plus")
    write_toy_dpt(paths["depth_eval"], seed + 7, "large")
    return {name: str(path) for name, path in paths.items()}
