"""Flag checks shared by the entry points: numbers finite, in range and bounded; paths that exist.

argparse's ``type=float`` accepts ``nan`` and ``inf``; they then pass every ``<``/``>`` check
(comparisons with NaN are False) and silently change what a run does: ``--grad_scale nan``
dropped the reward and wrote NaN (not valid JSON) into the saved config, ``--guidance_scale
nan`` switched guidance off. Each check raises ``ValueError`` with a sentence naming the flag.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

# Above this a single SD1.5 image's latent has (2048/8)^2 = 65k tokens per attention layer; larger
# sizes do not fit any GPU's memory and make a CPU run for days, so a typo (an extra 0) is refused.
MAX_RESOLUTION = 2048


def boolean(value: str) -> bool:
    """argparse type of a boolean flag's value: ``True``/``False``/``1``/``0``/``yes``/``no`` (the
    original's ``type=bool`` took "False" as True)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def reject_nonfinite(args, names: list[str] | None = None) -> None:
    """Every float flag (or those in ``names``) must be a finite number."""
    for name, value in sorted(vars(args).items()):
        if names is not None and name not in names:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"--{name} must be a finite number, got {item}.")


def require(args, name: str, low=None, high=None, low_inclusive: bool = True, why: str = "") -> None:
    """``low <= --name <= high`` (``low < --name`` when not ``low_inclusive``); None: unchecked."""
    value = getattr(args, name)
    if value is None:
        return
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and value > high
    if too_low or too_high:
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        raise ValueError(f"--{name} must be {' and '.join(bounds)}, got {value}" + (f" ({why})." if why else "."))


def check_resolution(args, name: str = "resolution", multiple_of: int = 8) -> None:
    """A positive multiple of ``multiple_of`` up to MAX_RESOLUTION."""
    value = getattr(args, name)
    if value is None:
        return
    require(args, name, low=multiple_of, high=MAX_RESOLUTION,
            why="larger images do not fit in any GPU's memory" if value > MAX_RESOLUTION else "a size in pixels")
    if value % multiple_of:
        raise ValueError(f"--{name} {value} is not divisible by {multiple_of} (the VAE's factor); use e.g. "
                         f"{value // multiple_of * multiple_of}.")


def looks_local(name_or_path: str) -> bool:
    """Whether a model / dataset name is meant as a local path rather than a hub id ``owner/name``.

    Absolute, ``./`` or ``~`` paths, more than one ``/``, a backslash, or an ``a/b`` whose ``a``
    is a folder here (``work_dirs/x`` when work_dirs/ exists): such names are never looked up on
    the hub, so a typo gives "no such folder" instead of DNS lookups and "Repo id must be ...".
    """
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        return True
    return text.count("/") == 1 and Path(text.split("/")[0]).expanduser().is_dir()


def check_local_path(flag: str, name_or_path, kind: str = "folder") -> None:
    """A ``name_or_path`` that looks local must exist (as a ``kind``: "folder", "file" or "any")."""
    if name_or_path is None:
        return
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise ValueError(f"{flag} {name_or_path} is a file; pass the model folder.")
        if kind == "file" and not path.is_file():
            raise ValueError(f"{flag} {name_or_path} is a folder; pass a file.")
        return
    if kind == "file" or looks_local(str(name_or_path)):
        what = {"file": "file", "folder": "folder"}.get(kind, "file or folder")
        hub = "" if kind == "file" else "; it was not looked up on the hub"
        raise ValueError(f"{flag} {name_or_path}: no such {what} (looked in {Path.cwd()}{hub}).")


def check_writable_dir(flag: str, folder) -> None:
    """``folder`` is, or can be created as, a writable folder (checked before minutes of model loading)."""
    path = Path(str(folder)).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {folder} is a file; pass a folder (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, so the folder cannot be created.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {existing} is not writable by this user; pass another folder.")
