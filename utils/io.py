"""Atomic file writes: a file that exists under its final name is always complete.

Evaluation and inference runs can be killed at any moment and started again; they treat an
existing output file as done, so a half-written file must never carry the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


def _current_umask() -> int:
    """The process's umask (from /proc on Linux; elsewhere set and restored at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; final files get the usual 0666 & ~umask.
_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (same folder, same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # readable by the group / others like any other output file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Save an image atomically as PNG (never JPEG: its artefacts corrupt label maps). zlib level 1:
    lossless like every level, 3-4x faster to write than the default 6 for ~15% larger files."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def hstack_images(images: list[Image.Image]) -> Image.Image:
    """Images side by side, top-aligned, on a black RGB canvas as tall as the tallest."""
    grid = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        grid.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return grid


def vstack_images(images: list[Image.Image]) -> Image.Image:
    """Images one below the other, left-aligned, on a black RGB canvas as wide as the widest."""
    grid = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)))
    y = 0
    for im in images:
        grid.paste(im.convert("RGB"), (0, y))
        y += im.height
    return grid
