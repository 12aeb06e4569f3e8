"""The pretrained toy world that ships with the repository, restored in seconds.

    python -m toy.committed --out work_dirs/toy-pretrained      # restore it (no training, no mmcv)
    python -m toy.committed --update work_dirs/toy-pretrained   # maintainers: ship a newly made one

``toy/weights/`` holds every file of the pretrained toy world (``python -m toy.pretrain`` on an
``f4`` world, then the per-task baseline ControlNets that ``python -m toy.experiment`` trains into
``controlnets/<task>``) except its datasets: those are a pure function of the seed
(``toy/world.py``) and are regenerated here, which keeps the repository small and needs no
training. ``SHA256SUMS`` lists every shipped file; a restore checks each one before it writes,
so a truncated clone or a Git LFS pointer is named, not silently used.

Restoring needs neither mmcv nor any training: it is the quickstart's path on a machine set up
with ``bash scripts/setup.sh --without-segmentation``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from toy.world import MANIFEST_NAME, _write_datasets, refuse_foreign_folder, replace_folder

BUNDLE = Path(__file__).resolve().parent / "weights"
SUMS_NAME = "SHA256SUMS"
# What a restored world records of the bundle it came from (and what --out compares to skip work).
RESTORED_KEY = "restored_from_bundle"
REGENERATED = "datasets/"  # the folder a bundle leaves out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sums(bundle: Path) -> dict[str, str]:
    sums_file = bundle / SUMS_NAME
    if not sums_file.is_file():
        raise FileNotFoundError(f"{sums_file} is missing: {bundle} is not a toy world bundle "
                                "(python -m toy.committed --update <pretrained world> writes one).")
    sums = {}
    for number, line in enumerate(sums_file.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{sums_file}, line {number}: expected '<sha256>  <path>', got {line!r}.")
        sums[name] = digest
    return sums


def bundle_digest(bundle: Path = BUNDLE) -> str:
    """One hash for the whole bundle: the hash of its SHA256SUMS."""
    return _sha256(bundle / SUMS_NAME)


def check_bundle(bundle: Path = BUNDLE) -> dict[str, str]:
    """Every shipped file against SHA256SUMS; returns the sums. Raises naming the first bad file."""
    sums = _read_sums(bundle)
    for name, digest in sums.items():
        path = bundle / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {bundle / SUMS_NAME} but missing: the checkout is "
                                    "incomplete (git checkout -- toy/weights restores it).")
        if _sha256(path) != digest:
            hint = " (it is a Git LFS pointer: run git lfs pull)" if path.read_bytes()[:40].startswith(
                b"version https://git-lfs") else ""
            raise ValueError(f"{path} does not match its sha256 in {bundle / SUMS_NAME}{hint}: the shipped "
                             "pretrained world is damaged; git checkout -- toy/weights restores it.")
    return sums


def is_restored(out: Path, bundle: Path = BUNDLE) -> bool:
    """``out`` holds a complete world restored from this very bundle."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get(RESTORED_KEY) != bundle_digest(bundle):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size
               for name, size in manifest.get("files", {}).items())


def restore(out: str | os.PathLike, bundle: Path = BUNDLE) -> dict:
    """Write the shipped pretrained world to ``out``; return its manifest (as on disk).

    Nothing happens if ``out`` already holds this bundle's world. Otherwise the world is built in
    a temporary sibling folder and renamed into place, so an interrupted restore leaves nothing
    that looks complete, and a folder that is not a toy world is never replaced.
    """
    out = Path(out)
    if is_restored(out, bundle):
        return json.loads((out / MANIFEST_NAME).read_text())
    refuse_foreign_folder(out)
    sums = check_bundle(bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        for name in sums:
            if name == MANIFEST_NAME:
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / name, tmp / name)
        _write_datasets(tmp, manifest["seed"], manifest["rows"])
        manifest["files"] = {p.relative_to(tmp).as_posix(): p.stat().st_size
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest[RESTORED_KEY] = bundle_digest(bundle)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _shipped(relative: Path) -> bool:
    """Whether a file of a pretrained world goes into the bundle: not its datasets (regenerated), not
    what training runs leave beside their final model (checkpoints with optimizer states, validation
    images, tensorboard logs), not hidden files, not the manifest (rewritten)."""
    parts = relative.parts
    return not (relative.as_posix().startswith(REGENERATED) or relative.as_posix() == MANIFEST_NAME
                or any(part.startswith((".", "checkpoint-")) or part in ("logs", "validation") for part in parts))


def update(world: str | os.PathLike, bundle: Path = BUNDLE) -> dict[str, str]:
    """Replace the bundle by the pretrained world ``world`` (all but its datasets); returns the sums."""
    world = Path(world)
    manifest = json.loads((world / MANIFEST_NAME).read_text())
    if "pretrained" not in manifest:
        raise ValueError(f"{world / MANIFEST_NAME} has no 'pretrained' section: ship a world written by "
                         "python -m toy.pretrain (and its baselines), not a random one.")
    manifest.pop(RESTORED_KEY, None)
    files = sorted(p for p in world.rglob("*") if p.is_file() and _shipped(p.relative_to(world)))
    manifest["files"] = {p.relative_to(world).as_posix(): p.stat().st_size for p in files}
    tmp = bundle.parent / f".{bundle.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for path in files:
            target = tmp / path.relative_to(world)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        shipped = sorted([*manifest["files"], MANIFEST_NAME])
        sums = {name: _sha256(tmp / name) for name in shipped}
        (tmp / SUMS_NAME).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
        replace_folder(tmp, bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sums


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m toy.committed")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="restore the shipped pretrained world to this folder")
    action.add_argument("--update", metavar="WORLD", help="maintainers: replace toy/weights by this pretrained world")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.out:
        manifest = restore(args.out)
        print(f"pretrained toy world ({len(manifest['files'])} files, datasets regenerated) at {args.out}: "
              f"{time.perf_counter() - start:.1f} s")
    else:
        sums = update(args.update)
        size = sum((BUNDLE / name).stat().st_size for name in sums)
        print(f"toy/weights: {len(sums)} files, {size / 2**20:.1f} MiB, from {args.update}")


if __name__ == "__main__":
    main()
