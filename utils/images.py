"""One way to read an image everywhere: training, evaluation, inference and the demo.

``PIL.Image.convert("RGB")`` saturates 16-bit grayscale (a 16-bit depth map turns white: every
value above 255 becomes 255), while training rescaled it; evaluation, inference and the demo then
scored or conditioned on a different image than the one trained on. ``to_mode`` is the single
conversion: 16/32-bit and float grayscale rescaled to 8 bits by their peak (as training always
did), palette images through their palette, CMYK to RGB, alpha dropped (the colour channels as
stored, which is what a ControlNet condition and a label map mean).
"""
from __future__ import annotations

import os
from pathlib import Path

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageReadError(ValueError):
    """An image file or cell that cannot be decoded; the message names it."""


def to_mode(image, mode: str = "RGB"):
    """``image`` (any PIL mode) as ``mode`` ("RGB" or "L"), 16-bit values rescaled, not clipped."""
    import numpy as np
    from PIL import Image

    if image.mode in HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0
        if peak > 255:
            array = array * (255.0 / peak)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # through the palette (and its transparency), then alpha dropped below
    if mode == "L" and image.mode not in ("L", "LA", "1"):
        image = image.convert("RGB")  # CMYK / YCbCr / RGBA: via RGB, so luminance is computed the usual way
    # L, LA, RGBA, CMYK, ...: PIL's conversion keeps the colours and drops alpha. Always a new,
    # loaded image (convert copies even within a mode), so it outlives a `with Image.open(...)`.
    return image.convert(mode)


def read_image(path_or_pil, mode: str = "RGB", what: str = "image"):
    """A PIL image (decoded now, so a truncated file fails here) in ``mode``.

    ``path_or_pil``: a path, raw bytes, or a PIL image. ``what`` names the input in errors
    (e.g. "--image", "row 3 of column 'image'").
    """
    import io

    from PIL import Image

    try:
        if isinstance(path_or_pil, Image.Image):
            image = path_or_pil
        elif isinstance(path_or_pil, (bytes, bytearray)):
            image = Image.open(io.BytesIO(path_or_pil))
        else:
            path = Path(path_or_pil).expanduser()
            if path.is_dir():
                raise ImageReadError(f"{what}: {path} is a folder, not an image file.")
            if not path.is_file():
                raise ImageReadError(f"{what}: {path} does not exist.")
            image = Image.open(path)
        image.load()
        return to_mode(image, mode)
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(f"{what}: cannot read it as an image ({type(error).__name__}: {error}).") from error
