"""Datasets: local folders written by ``save_to_disk`` or hub ids, and the training transforms."""
from __future__ import annotations

import json
import os
from pathlib import Path


def load_dataset_any(name_or_path: str, split: str | None = None, cache_dir: str | None = None,
                     config_name: str | None = None):
    """Load a dataset from a local ``save_to_disk`` folder, or from the hub by id.

    A local folder never touches the network. ``split`` picks one split of a ``DatasetDict``;
    a saved single ``Dataset`` is returned as it is whatever the split. ``config_name`` is the
    hub dataset's configuration (``--dataset_config_name``); a local folder has none.
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
        if config_name is not None:
            raise ValueError(f"--dataset_config_name {config_name} is for hub datasets; {path} is a local folder "
                             "written by save_to_disk, which has no configurations. Drop the flag.")
        split_dir = path / split if split else None
        if split_dir is not None and (split_dir / "state.json").is_file() and \
                not json.loads((split_dir / "state.json").read_text()).get("_data_files"):
            raise ValueError(f"dataset {name_or_path} (split {split}) has no rows; pass a split that has some.")
        try:
            ds = datasets.load_from_disk(str(path))
        except IndexError:  # datasets cannot load a DatasetDict with an empty split: load ours alone
            if split_dir is None or not (split_dir / "state.json").is_file():
                raise
            ds = datasets.load_from_disk(str(split_dir))
    else:
        from utils.flags import looks_local

        if looks_local(name_or_path):  # never a hub lookup for a mistyped local path (work_dirs/x)
            raise FileNotFoundError(f"dataset folder {name_or_path} does not exist (looked in {Path.cwd()}).")
        ds = datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else next(iter(ds))
        if split not in ds:
            raise KeyError(
                f"dataset {name_or_path} has no split {split!r}; it has {sorted(ds)}. "
                "Pass one of them (e.g. --dataset_split validation)."
            )
        ds = ds[split]
    if len(ds) == 0:  # an empty split crashed inside datasets, or let eval.py write an empty folder
        raise ValueError(f"dataset {name_or_path} (split {split}) has no rows; pass a split that has some.")
    return ds


# --------------------------------------------------------------------------------------------
# Training rows: decoding, transforms, collation
# --------------------------------------------------------------------------------------------


def require_columns(dataset, columns: dict[str, str | None], dataset_name: str) -> None:
    """Fail early, naming the flag, if a configured column is not in the dataset.

    ``columns`` maps a flag (``--image_column``) to its value; None values are not checked.
    """
    available = list(dataset.column_names)
    for flag, column in columns.items():
        if column is not None and column not in available:
            raise ValueError(
                f"{flag} {column!r} is not a column of dataset {dataset_name}; its columns are "
                f"{available}. Pass {flag} with one of them."
            )


def rows_to_keep(wrong_ids_file: str, num_rows: int) -> list[int]:
    """Row indices not listed in ``--wrong_ids_file`` (a JSON list of integers)."""
    path = Path(wrong_ids_file)
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise ValueError(f"--wrong_ids_file {path}: pickles can run code when read and are not loaded. Convert it "
                         "once: python -c \"import json,pickle,sys; json.dump(sorted(pickle.load(open(sys.argv[1],'rb')))"
                         ", open(sys.argv[2],'w'))\" OLD.pkl NEW.json, and pass the .json file.")
    try:
        wrong = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--wrong_ids_file {path}: cannot read a JSON list of row indices ({error}).") from error
    if not isinstance(wrong, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in wrong):
        raise ValueError(f"--wrong_ids_file {path} must hold a JSON list of integer row indices.")
    excluded = set(wrong)
    return [i for i in range(num_rows) if i not in excluded]


def _pil_from_value(value, column: str, index: int, dataset_name: str | None = None):
    """Decode one stored image cell (datasets ``Image`` with decode=False, a path, an array, a PIL image)."""
    import io

    import numpy as np
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            raise TypeError(f"unsupported cell type {type(value).__name__}")
        image.load()  # decode now: a truncated file must fail here, where the row is known
    except Exception as error:
        raise ValueError(
            f"{dataset_name + ': ' if dataset_name else ''}row {index} of column {column!r}: cannot read the image ({type(error).__name__}: {error}). "
            "Fix or remove that row (e.g. dataset.filter, then save_to_disk) and pass the fixed dataset."
        ) from error
    return image


def to_rgb(image):
    """Any PIL mode -> RGB, the one conversion of every stage (utils/images.py: 16-bit rescaled)."""
    from utils.images import to_mode

    return to_mode(image, "RGB")


RESIZE_MODES = ("squash", "center_crop", "random_crop")
RESIZE_INTERPOLATIONS = ("bicubic", "bilinear")


class ControlNetRows:
    """A map-style dataset of training rows: the transforms of REFERENCE.md "Data".

    ``resize_mode`` says how an image becomes ``resolution`` x ``resolution``:
    - ``squash`` (the original reward stage, ``reward_control.py``): resized to exactly
      resolution x resolution, aspect ratio not kept; the original's random crop is then a no-op.
    - ``center_crop`` (the original stage one, ``train_controlnet.py``): shorter side resized to
      ``resolution``, then the centre crop.
    - ``random_crop`` (aspect kept): shorter side resized, one random crop (centred when
      ``train`` is False) applied jointly to image, condition and label.
    ``resize_interpolation`` is ``bicubic`` (reward stage) or ``bilinear`` (stage one), with
    antialiasing; labels are mapped to classes at full size and resized nearest, or, with
    ``label_from_resized`` (the original's ADE20K labels), resized like the condition and mapped after. The target image is normalised to [-1, 1]
    as ``Normalize([0.5], [0.5])`` does it, the condition stays in [0, 1]. CPO's losing condition
    (``loser_conditioning_image_column``) goes through the condition's resize and crop.

    Randomness (crop, caption choice, condition dropout) comes from a generator seeded by
    (seed, epoch, row index), so a row transforms the same way whatever the worker, the number
    of processes or a resume in the middle of an epoch. Call ``set_epoch`` at each epoch.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        resolution: int,
        image_column: str,
        caption_column: str,
        conditioning_image_column: str | None = None,
        label_column: str | None = None,
        label_from_image=None,
        train: bool = True,
        seed: int = 0,
        image_condition_dropout: float = 0.0,
        text_condition_dropout: float = 0.0,
        all_condition_dropout: float = 0.0,
        dataset_name: str = "the dataset",
        resize_mode: str = "squash",
        resize_interpolation: str = "bicubic",
        label_from_resized=None,
        loser_conditioning_image_column: str | None = None,
    ):
        import datasets

        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if resize_interpolation not in RESIZE_INTERPOLATIONS:
            raise ValueError(f"resize_interpolation must be one of {RESIZE_INTERPOLATIONS}, got {resize_interpolation!r}")
        self.resize_mode, self.resize_interpolation = resize_mode, resize_interpolation
        # The original's ADE20K labels: the label image resized like the condition, then mapped
        # (``label_from_resized``: (3, R, R) float in [0, 1] -> (R, R) int64); default: mapped, then resized.
        self.label_from_resized = label_from_resized

        require_columns(
            dataset,
            {"--image_column": image_column, "--caption_column": caption_column,
             "--conditioning_image_column": conditioning_image_column, "--label_column": label_column,
             "--loser_conditioning_image_column": loser_conditioning_image_column},
            dataset_name,
        )
        if label_column is not None and label_from_image is None:
            raise ValueError("--label_column needs a reward model that turns label images into class maps.")
        self.image_columns = [c for c in (image_column, conditioning_image_column, label_column,
                                          loser_conditioning_image_column) if c is not None]
        # Unused columns (e.g. ADE20K's seg_map) would otherwise be read and decoded for every row.
        dataset = dataset.select_columns(list(dict.fromkeys([*self.image_columns, caption_column])))
        # Decode images ourselves, column by column, so a corrupt cell is reported with its column and row.
        for column in set(self.image_columns):
            if isinstance(dataset.features.get(column), datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.image_column, self.caption_column = image_column, caption_column
        self.conditioning_image_column, self.label_column = conditioning_image_column, label_column
        self.label_from_image = label_from_image
        self.loser_conditioning_image_column = loser_conditioning_image_column
        self.dataset_name = dataset_name  # "<name> (<split>)": row errors name dataset, split, row and column
        self.train = train
        self.seed = seed
        self.dropouts = (image_condition_dropout, text_condition_dropout, all_condition_dropout)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _rng(self, index: int):
        import numpy as np

        return np.random.default_rng([self.seed, self.epoch, index])

    def caption(self, index: int, rng=None) -> str:
        """The row's caption: a random one of a list in training (``rng``), the first otherwise."""
        value = self.dataset[index][self.caption_column]
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{self.dataset_name}: row {index} of column {self.caption_column!r}: expected a string or a non-empty "
                                 f"list of strings, got {value!r}.")
            return value[int(rng.integers(len(value)))] if rng is not None else value[0]
        if not isinstance(value, str):
            raise ValueError(f"{self.dataset_name}: row {index} of column {self.caption_column!r}: expected a string or a list of "
                             f"strings, got {type(value).__name__}. Pass the right --caption_column.")
        return value

    def _resize_and_crop(self, rng):
        """The row's geometry: a function (PIL image or (C,H,W) tensor, interpolation) -> (C,R,R) tensor.

        Each input is resized on its own, from its own size, as the original's torchvision
        transforms did; the crop offsets (random_crop) are drawn once, from the first input's
        resized size, and shared by the condition and the label.
        """
        import torch
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        size = self.resolution
        modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                 "nearest": InterpolationMode.NEAREST}
        offsets = {}

        def apply(value, interpolation: str):
            mode = modes[interpolation]
            if self.resize_mode == "squash":
                resized = TF.resize(value, [size, size], interpolation=mode, antialias=True)
                return resized if isinstance(resized, torch.Tensor) else TF.to_tensor(resized)
            if self.resize_mode == "center_crop":  # each input from its own size, as the original's stage one
                resized = TF.resize(value, size, interpolation=mode, antialias=True)
                tensor = resized if isinstance(resized, torch.Tensor) else TF.to_tensor(resized)
                return TF.center_crop(tensor, [size, size])
            # random_crop: the image's shorter side to ``size``; the condition and label resized to the
            # image's resized size (so a condition of another size stays aligned), one shared crop.
            target = offsets.get("size", size)
            resized = TF.resize(value, target, interpolation=mode, antialias=True)
            tensor = resized if isinstance(resized, torch.Tensor) else TF.to_tensor(resized)
            height, width = tensor.shape[-2:]
            if "size" not in offsets:
                offsets["size"] = [height, width]
                offsets["top"] = int(rng.integers(height - size + 1)) if rng is not None else (height - size) // 2
                offsets["left"] = int(rng.integers(width - size + 1)) if rng is not None else (width - size) // 2
            top, left = offsets["top"], offsets["left"]
            return tensor[..., top : top + size, left : left + size]

        return apply

    def __getitem__(self, index: int) -> dict:
        import torch

        rng = self._rng(index) if self.train else None
        row = self.dataset[index]
        resize = self._resize_and_crop(rng)
        image = to_rgb(_pil_from_value(row[self.image_column], self.image_column, index, self.dataset_name))
        # (x - 0.5) / 0.5 exactly as torchvision's Normalize([0.5], [0.5]) computes it (the
        # original's transform), not 2x - 1, which rounds differently in the last bit.
        out = {"pixel_values": (resize(image, self.resize_interpolation) - 0.5) / 0.5, "index": index}
        if self.conditioning_image_column is not None:
            condition = to_rgb(_pil_from_value(row[self.conditioning_image_column], self.conditioning_image_column, index,
                                                    self.dataset_name))
            out["conditioning_pixel_values"] = resize(condition, self.resize_interpolation)
        if self.loser_conditioning_image_column is not None:  # CPO: the losing condition, same geometry
            loser = to_rgb(_pil_from_value(row[self.loser_conditioning_image_column],
                                           self.loser_conditioning_image_column, index, self.dataset_name))
            out["loser_conditioning_pixel_values"] = resize(loser, self.resize_interpolation)
        if self.label_column is not None:
            label_image = _pil_from_value(row[self.label_column], self.label_column, index, self.dataset_name)
            if self.label_from_resized is not None:
                out["labels"] = self.label_from_resized(resize(to_rgb(label_image), self.resize_interpolation)).long()
            else:
                label = torch.from_numpy(self.label_from_image(label_image)).long()
                out["labels"] = resize(label[None], "nearest")[0]

        caption = self.caption(index, rng)
        # Condition dropout for classifier-free guidance (paper follows ControlNet: all 0 by
        # default). One uniform draw picks at most one of: drop image, drop text, drop both.
        drop_image = drop_text = False
        if rng is not None and sum(self.dropouts) > 0:
            u = float(rng.random())
            p_image, p_text, p_all = self.dropouts
            drop_image = u < p_image or p_image + p_text <= u < p_image + p_text + p_all
            drop_text = p_image <= u < p_image + p_text + p_all
        if drop_text:
            caption = ""
        out["input_ids"] = self.tokenizer(
            caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids[0]
        # The ControlNet input is zeroed in the training step, not here: canny/hed/lineart compute
        # it there, and the depth reward's target must still see the real control_depth.
        out["drop_condition"] = drop_image
        return out


def collate_rows(rows: list[dict]) -> dict:
    """Stack rows into the batch of docs/ARCHITECTURE.md "Collated training batch"."""
    import torch

    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values).contiguous()
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = torch.tensor(values, dtype=torch.int64)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].float().contiguous(memory_format=torch.contiguous_format)
    return batch
