"""Datasets: local folders written by ``save_to_disk`` or hub ids, and the training transforms."""
from __future__ import annotations

import os
from pathlib import Path


def load_dataset_any(name_or_path: str, split: str | None = None, cache_dir: str | None = None):
    """Load a dataset from a local ``save_to_disk`` folder, or from the hub by id.

    A local folder never touches the network. ``split`` picks one split of a ``DatasetDict``;
    a saved single ``Dataset`` is returned as it is whatever the split.
    """
    import datasets

    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        if not ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()
                or (path / "state.json").exists()):
            raise FileNotFoundError(
                f"{path} exists but is not a dataset saved with `save_to_disk` (no dataset_dict.json "
                "or state.json inside). Pass the folder written by `Dataset.save_to_disk`, or a hub id."
            )
        ds = datasets.load_from_disk(str(path))
    else:
        if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
            raise FileNotFoundError(f"dataset folder {name_or_path} does not exist")
        ds = datasets.load_dataset(name_or_path, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else next(iter(ds))
        if split not in ds:
            raise KeyError(
                f"dataset {name_or_path} has no split {split!r}; it has {sorted(ds)}. "
                "Pass one of them (e.g. --dataset_split validation)."
            )
        return ds[split]
    return ds
