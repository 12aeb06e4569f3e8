"""Segmentation palettes: colour <-> class index for the control_seg images.

ADE20K: ``limingcv/Captioned_ADE20K``'s control_seg images paint class c (0..149) with
mmseg's ``ADE20KDataset.METAINFO['palette'][c]`` and the unlabelled background black. The
label of a pixel is the nearest of the 151 colours (black first), minus one, with background
255 (ignored), as the original release's ``ade20k_palette.npy`` mapping.

The tables are copied from mmseg 1.2.2 (``mmseg/datasets/ade.py`` and ``coco_stuff.py``) so
that the data pipeline can map labels without importing mmseg (which needs compiled mmcv);
tests/test_reward_models.py checks them against mmseg's METAINFO when mmseg is importable.

Note: mmseg's ADE20K palette paints classes 6 (road) and 48 (skyscraper) with the same
colour (140, 140, 140); a palette image cannot tell them apart and such pixels map to the
first, class 6, exactly like the original argmin over the palette. The COCO-Stuff palette has
duplicates too, which is why COCO-Stuff labels come from panoptic_seg_map, not from colours.
"""
from __future__ import annotations

import numpy as np

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

COCO_STUFF_PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224),
    (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224),
    (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128),
    (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160), (0, 32, 0), (0, 128, 128),
    (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128), (0, 0, 128),
    (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192),
    (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192),
    (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192),
    (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192),
    (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128),
    (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192),
    (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192),
    (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224), (0, 32, 128), (192, 128, 192),
    (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128),
    (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128),
    (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192),
    (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192),
    (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
)


# Black background first, so that nearest-colour index - 1 is the ADE20K class (background -> -1 -> 255).
ADE20K_PALETTE_WITH_BACKGROUND = ((0, 0, 0),) + ADE20K_PALETTE
IGNORE_INDEX = 255


def palette_image_to_index(image: np.ndarray, palette=ADE20K_PALETTE_WITH_BACKGROUND) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 index of the nearest palette colour (first on ties).

    Nearest, not exact, match: resized or re-encoded palette images have colours in between.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB palette image of shape (H, W, 3), got {image.shape}")
    colours = np.asarray(palette, dtype=np.int64)                          # (K, 3)
    pixels = image.reshape(-1, 3).astype(np.int64)
    # Work on the unique colours only (a segmentation image has a few dozen); packing RGB into
    # one integer makes np.unique a fast 1-D sort.
    codes, inverse = np.unique((pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2], return_inverse=True)
    unique = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1)
    distances = ((unique[:, None, :] - colours[None, :, :]) ** 2).sum(-1)  # (U, K)
    nearest = distances.argmin(axis=1)                                     # first minimum on ties
    return nearest[inverse.reshape(-1)].reshape(image.shape[:2]).astype(np.int64)


def ade20k_palette_to_label(image: np.ndarray) -> np.ndarray:
    """ADE20K control_seg / seg_map RGB image -> (H, W) int64 class 0..149, background 255."""
    index = palette_image_to_index(image, ADE20K_PALETTE_WITH_BACKGROUND) - 1
    index[index < 0] = IGNORE_INDEX
    return index


def ade20k_resized_palette_to_label(image01):
    """The original release's ADE20K training labels: a *resized* palette condition (3, H, W) float in
    [0, 1] -> (H, W) int64, each pixel the nearest of the 151 colours by Euclidean distance on the
    0..255 scale in the tensor's float arithmetic (first minimum), minus one, background 255.
    Bicubic resizing blends the colours at class borders, which can land on a third class; the
    default maps the full-size palette image instead (``ade20k_palette_to_label``)."""
    import torch

    palette = torch.tensor(ADE20K_PALETTE_WITH_BACKGROUND, dtype=image01.dtype, device=image01.device)
    pixels = (image01 * 255).permute(1, 2, 0).reshape(-1, 3)
    # In chunks of pixels (the same per-pixel arithmetic): all at once a 512 px image needs ~0.5 GB.
    index = torch.cat([torch.argmin(torch.norm(chunk[:, None, :] - palette, dim=-1), dim=-1)
                       for chunk in pixels.split(16384)]) - 1
    index[index < 0] = IGNORE_INDEX
    return index.view(image01.shape[1], image01.shape[2])


def label_to_palette_image(label: np.ndarray, palette) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB; ignore (255) and unknown classes are black."""
    label = np.asarray(label)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return colours[np.clip(label, 0, 255)]
