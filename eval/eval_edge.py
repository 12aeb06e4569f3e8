"""Controllability of the edge tasks (paper Table 1): canny F1, hed / lineart SSIM.

Compares, for every generated image, the condition extracted from it (``conditions/group_<k>/<idx>.png``,
written by eval/eval.py with the task's annotator as the original release stored it) with the
input condition (``annotations/<idx>.png``). Two scorings are computed in every run and written
side by side in ``results.json``:

- ``edge_paper`` (the paper protocol): exactly what the original release's ``eval_edge.py``
  computed, defects included, which is where the paper's numbers come from. Per prompt, its 4
  images are scored together: canny F1 of their pooled binary pixels, PSNR of their pooled
  squared error, MS-SSIM averaged over the 4; then averaged over prompts. MS-SSIM is
  torchmetrics <= 1.4.1's (the coarsest scale's SSIM map averaged without its border), what a
  2024 install ran. For lineart the generated drawing is inverted with ``1 - x`` on uint8,
  which wraps around (defect 2 of REFERENCE.md: 0 -> 1, 1 -> 0, 2 -> 255).
- ``edge`` (corrected): every image scored on its own, then averaged; lineart compared in the
  ControlNet's format without the wrap-around; MS-SSIM as torchmetrics >= 1.4.2 defines it.

Canny F1: an edge is a pixel whose stored value is above 0 (binary maps after hysteresis).

    python eval/eval_edge.py --root_dir work_dirs/eval/lineart/controlnet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import (RowDataset, annotation_path, benchmark_name, full_float32, load_config, require_complete,
                         require_original_protocol, require_task_scored_here, resolve_device, row_loader,
                         write_results)
from reward_models import reward_class
from utils import metrics


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Score canny / hed / lineart evaluation folders.")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--reference_scoring", action="store_true",
                        help="accepted for older command lines: both scorings are always computed")
    parser.add_argument("--batch_size", type=int, default=16, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def score_batch(task: str, prediction: torch.Tensor, annotation: torch.Tensor, paper: bool) -> dict:
    """Scores of a batch of rows: prediction (B, G, H, W) uint8, annotation (B, H, W) uint8.

    Returns per-image values (B, G) (corrected) or per-row values (B,) (paper protocol).
    """
    reward_model = reward_class(task)
    batch, groups, height, width = prediction.shape
    target = annotation[:, None].expand(batch, groups, height, width)
    target01 = target.float() / 255.0
    if paper and reward_model.paper_protocol_wraps_inversion:
        # The original stored the un-inverted drawing; ours is its uint8 complement (255 - stored).
        pred01 = metrics.lineart_reference_inversion(255 - prediction)
    else:
        pred01 = prediction.float() / 255.0
    flat = lambda x: x.reshape(batch * groups, 1, height, width)  # noqa: E731
    scores = {}
    if min(height, width) > metrics.MS_SSIM_MIN_SIZE:
        # One call per prompt on its images, as the original's torchmetrics object was called: a
        # convolution's float rounding may depend on the batch.
        ms_ssim = torch.stack([metrics.ms_ssim(p[:, None], t[:, None], crop_ssim_border=paper)
                               for p, t in zip(pred01, target01)])
        scores["ms_ssim"] = ms_ssim.mean(1) if paper else ms_ssim
    if paper:
        scores["psnr"] = torch.stack([metrics.psnr_pooled(p, t) for p, t in zip(pred01, target01)])
    else:
        scores["psnr"] = metrics.psnr(flat(pred01), flat(target01)).view(batch, groups)
    if reward_model.binary_annotation:
        pred_edges, target_edges = prediction > 0, target > 0
        if paper:
            counts = metrics.binary_confusion_counts(pred_edges.flatten(1), target_edges.flatten(1))
            scores["f1"] = metrics.f1_from_counts_float32(*counts) * 100
        else:
            scores["f1"] = metrics.binary_f1(flat(pred_edges), flat(target_edges)).view(batch, groups) * 100
    return scores


def metrics_size(root_dir, row: int) -> tuple[int, int]:
    from PIL import Image

    with Image.open(annotation_path(root_dir, row)) as image:
        return image.size


def main(args=None):
    args = parse_args(args)
    full_float32()
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    require_original_protocol(args.root_dir, config)
    task, num_groups = require_task_scored_here(args.root_dir, config, "eval/eval_edge.py"), int(config["num_groups"])
    binary = reward_class(task).binary_annotation  # canny: F1 first, MS-SSIM secondary
    rows = require_complete(args.root_dir, config, generated=False, conditions=True)
    device = resolve_device(args.device)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, conditions=True), args.batch_size, args.num_workers)
    names = ["f1", "ms_ssim", "psnr"] if binary else ["ms_ssim", "psnr"]
    size = min(metrics_size(args.root_dir, rows[0]))
    if size <= metrics.MS_SSIM_MIN_SIZE:
        if not binary:
            raise ValueError(f"{args.root_dir}: the maps are {size} px; MS-SSIM (5 scales of an 11x11 kernel) needs "
                             f"more than {metrics.MS_SSIM_MIN_SIZE} px. Generate with --resolution 192 or more "
                             "(--generation_resolution keeps a small model's own size).")
        # F1 is the metric of binary maps (canny); their MS-SSIM is secondary and undefined below 176 px.
        print(f"{task}: MS-SSIM not computed: the images are {size} px, it needs more than "
              f"{metrics.MS_SSIM_MIN_SIZE} px (5 scales of an 11x11 kernel). F1 and PSNR are.")
        names.remove("ms_ssim")
    # The paper protocol yields one value per prompt: a single bucket.
    corrected = {name: metrics.GroupedMean(num_groups) for name in names}
    paper = {name: metrics.GroupedMean(1) for name in names}
    for batch in tqdm(loader, desc=f"{task} scores"):
        prediction, annotation = batch["conditions"].to(device), batch["annotation"].to(device)
        for name, values in score_batch(task, prediction, annotation, paper=False).items():
            corrected[name].update(values.flatten(), torch.arange(num_groups).expand_as(values).flatten())
        for name, values in score_batch(task, prediction, annotation, paper=True).items():
            paper[name].update(values, torch.zeros_like(values, dtype=torch.long))

    common = {"task": task, "benchmark": benchmark_name(config), "num_rows": len(rows),
              "num_images": len(rows) * num_groups}
    settings = {"f1_unit": "percent", "edge_threshold": "condition value > 0", "psnr_cap_db": metrics.PSNR_CAP_DB}
    results = {
        **common, "scoring": "corrected",
        "metrics": {name: mean.mean() for name, mean in corrected.items()},
        "per_group": {name: mean.per_group() for name, mean in corrected.items()},
        "settings": {**settings, "pooling": "every image on its own", "ms_ssim": "torchmetrics >= 1.4.2 (full SSIM map)",
                     "lineart_inversion": "none (stored in the ControlNet format)"},
    }
    paper_results = {
        **common, "scoring": "paper",
        "metrics": {name: mean.mean() for name, mean in paper.items()},
        "settings": {**settings, "pooling": "per prompt (F1, PSNR pooled over its images), then over prompts",
                     "ms_ssim": "torchmetrics <= 1.4.1 (SSIM map border cropped)",
                     "lineart_inversion": "1 - x on uint8 (wraps around, defect 2)"},
    }
    write_results(args.root_dir, "edge", results)
    path = write_results(args.root_dir, "edge_paper", paper_results)
    for label, entry in (("paper protocol", paper_results), ("corrected", results)):
        print(f"{label}:", {name: round(value, 4) for name, value in entry["metrics"].items()},
              f"({len(rows)} rows) -> {path}")
    return {"corrected": results, "paper": paper_results}


if __name__ == "__main__":
    main()
