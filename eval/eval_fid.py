"""Image quality (paper Table 2): FID of each group of generated images against the real images.

clean-fid's "clean" protocol, as the original (``cleanfid.fid.compute_fid(real, group_k)``):
PIL bicubic resize of every image to 299x299 in float, Inception-v3 pool features
(``inception-2015-12-05.pt``), Fréchet distance. One FID per group, the reported FID is their
mean. Features are streamed into mean / covariance sums (no feature matrix in memory) and the
real images' statistics are computed once, not once per group.

    python eval/eval_fid.py --root_dir work_dirs/eval/canny/controlnet \
        --inception_path ~/models/inception-2015-12-05.pt

Real images: the rows of the evaluated split (``--image_column`` of ``--dataset_name``, both
read from eval_config.json by default) at their own size, or every image in
``--real_image_path`` (the original's real-image folder). Without --inception_path clean-fid
downloads its Inception file (network needed). Results go to ``results.json`` under "fid".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import os

import numpy as np
import torch
from PIL import Image

from eval.common import (benchmark_name, generated_path, load_config, require_complete, resolve_device, reused,
                         write_results)
from utils import metrics
from utils.images import to_mode

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="FID of an evaluation folder (clean-fid protocol).")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--inception_path", default=None,
                        help="local inception-2015-12-05.pt (clean-fid's file) or a TorchScript file with the same "
                             "interface; default: clean-fid downloads it")
    parser.add_argument("--real_image_path", default=None, help="folder of real images (default: the dataset rows)")
    parser.add_argument("--dataset_name", default=None, help="default: the run's (eval_config.json)")
    parser.add_argument("--dataset_split", default=None, help="default: the run's")
    parser.add_argument("--image_column", default=None, help="default: the run's")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


class CleanResized(torch.utils.data.Dataset):
    """Images as clean-fid feeds them to Inception: float (3, 299, 299) in 0..255."""

    def __init__(self, paths=None, dataset=None, column=None, rows=None):
        self.paths, self.dataset, self.column = paths, dataset, column
        self.rows = list(rows) if rows is not None else None
        self.resize = None  # built lazily in each worker

    def __len__(self):
        return len(self.paths) if self.paths is not None else len(self.rows)

    def __getitem__(self, i):
        from cleanfid.resize import build_resizer

        if self.resize is None:
            self.resize = build_resizer("clean")
        if self.paths is not None:
            with Image.open(self.paths[i]) as image:
                array = np.asarray(to_mode(image, "RGB"))
        else:
            array = np.asarray(to_mode(self.dataset[self.rows[i]][self.column], "RGB"))
        resized = self.resize(array)  # float32 (299, 299, 3) in 0..255, or uint8
        return torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)


def inception_features(path: str | None, device: torch.device):
    """Features (B, D) of clean-resized images, called as clean-fid calls its Inception."""
    if path is None:
        from cleanfid.features import build_feature_extractor

        return build_feature_extractor("clean", device, use_dataparallel=False)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--inception_path {path} does not exist; pass clean-fid's inception-2015-12-05.pt "
                                "(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/).")
    base = torch.jit.load(path, map_location=device).eval()
    if not hasattr(base, "layers"):
        raise ValueError(f"{path} has no `layers` submodule: it is not clean-fid's Inception TorchScript file.")

    def features(images: torch.Tensor) -> torch.Tensor:
        # cleanfid.inception_torchscript.InceptionV3W.forward with resize_inside=False.
        return base.layers.forward((images - 128) / 128).view(images.shape[0], -1)

    return features


def feature_stats(images: CleanResized, features, device, args, description: str) -> metrics.GaussianStats:
    from tqdm.auto import tqdm

    num_workers = args.num_workers if args.num_workers is not None else min(4, len(os.sched_getaffinity(0)))
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=num_workers)
    stats = metrics.GaussianStats()
    with torch.no_grad():
        for batch in tqdm(loader, desc=description):
            stats.update(features(batch.to(device)))
    return stats


def real_images(args, config: dict, rows: list[int]) -> CleanResized:
    if args.real_image_path:
        folder = Path(args.real_image_path)
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"--real_image_path {folder} holds no images ({sorted(IMAGE_SUFFIXES)}).")
        return CleanResized(paths=paths)
    from utils.data import load_dataset_any

    dataset = load_dataset_any(args.dataset_name or config["dataset_name"], args.dataset_split or config["dataset_split"])
    column = args.image_column or config["image_column"]
    if column not in dataset.column_names:
        raise KeyError(f"the real-image dataset has no column {column!r} (--image_column); it has {dataset.column_names}.")
    return CleanResized(dataset=dataset, column=column, rows=rows)


def main(args=None):
    args = parse_args(args)
    config = load_config(args.root_dir)
    rows = require_complete(args.root_dir, config)
    device = resolve_device(args.device)
    features = reused(("inception", args.inception_path, str(device)),
                      lambda: inception_features(args.inception_path, device))
    real_source = (args.real_image_path or (args.dataset_name or config["dataset_name"],
                                            args.dataset_split or config["dataset_split"],
                                            args.image_column or config["image_column"]))
    real = reused(("fid-real", real_source, tuple(rows), args.inception_path, str(device)),
                  lambda: feature_stats(real_images(args, config, rows), features, device, args, "real images"))
    per_group = []
    for group in range(int(config["num_groups"])):
        paths = [generated_path(args.root_dir, group, row) for row in rows]
        fake = feature_stats(CleanResized(paths=paths), features, device, args, f"group_{group}")
        per_group.append(metrics.frechet_distance(real, fake))

    results = {
        "task": config["task_name"],
        "benchmark": benchmark_name(config),
        "metrics": {"fid": float(np.mean(per_group))},
        "per_group": {"fid": per_group},
        "num_rows": len(rows),
        "num_real_images": real.n,
        "settings": {"inception": args.inception_path or "clean-fid download", "mode": "clean",
                     "real_images": args.real_image_path or f"{config['dataset_name']} ({config['dataset_split']})"},
    }
    path = write_results(args.root_dir, "fid", results)
    print(f"FID {results['metrics']['fid']:.4f} (groups {[round(f, 3) for f in per_group]}) -> {path}")
    return results


if __name__ == "__main__":
    main()
