"""Controllability of the edge tasks (paper Table 1): canny F1, hed / lineart SSIM.

Compares, for every generated image, the condition extracted from it (``conditions/group_<k>/<idx>.png``,
written by eval/eval.py with the task's annotator) with the input condition
(``annotations/<idx>.png``):
- canny: F1 of the binary edge maps (a pixel is an edge when its condition value is above 0,
  i.e. its NMS magnitude passed the 0.1 threshold), in percent; also MS-SSIM and PSNR;
- hed, lineart: multi-scale SSIM (data range 1, 5 scales, kernel 11) and PSNR.

    python eval/eval_edge.py --root_dir work_dirs/eval/lineart/controlnet [--reference_scoring]

Default scoring: every image scored on its own, then averaged (per group and over all). The
lineart condition is stored as the ControlNet input (1 - line drawing, inverted in float by the
annotator), so it is compared with the input condition as it is.

--reference_scoring reproduces the original release's eval_edge.py, for comparison with the
paper's numbers: each prompt's images are scored together (F1 of their pooled pixels, PSNR of
their pooled squared errors), then averaged over prompts; and for lineart the un-inverted line
drawing is inverted with ``1 - x`` on uint8, which wraps around (defect 2): 0 -> 1, 2 -> 255.
Results go to ``results.json`` under "edge" (or "edge_reference").
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import RowDataset, annotation_path, benchmark_name, load_config, require_complete, resolve_device, row_loader, write_results
from utils import metrics

EDGE_TASKS = ("canny", "hed", "lineart")


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Score canny / hed / lineart evaluation folders.")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--reference_scoring", action="store_true",
                        help="score as the original release did (per-prompt pooling, lineart uint8 wrap-around)")
    parser.add_argument("--batch_size", type=int, default=16, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def score_batch(task: str, prediction: torch.Tensor, annotation: torch.Tensor, reference: bool) -> dict:
    """Scores of a batch of rows: prediction (B, G, H, W) uint8, annotation (B, H, W) uint8.

    Returns per-image values (B, G) (default) or per-row values (B,) (reference).
    """
    batch, groups, height, width = prediction.shape
    target = annotation[:, None].expand(batch, groups, height, width)
    target01 = target.float() / 255.0
    if reference and task == "lineart":
        # The original stored the un-inverted drawing; ours is 1 - drawing, so it is 255 - ours.
        pred01 = metrics.lineart_reference_inversion(255 - prediction)
    else:
        pred01 = prediction.float() / 255.0
    flat = lambda x: x.reshape(batch * groups, 1, height, width)  # noqa: E731
    scores = {}
    if task != "canny" or min(height, width) > metrics.MS_SSIM_MIN_SIZE:
        scores["ms_ssim"] = metrics.ms_ssim(flat(pred01), flat(target01)).view(batch, groups)
        if reference:
            scores["ms_ssim"] = scores["ms_ssim"].mean(1)
    if reference:
        scores["psnr"] = torch.stack([metrics.psnr_pooled(p, t) for p, t in zip(pred01, target01)])
    else:
        scores["psnr"] = metrics.psnr(flat(pred01), flat(target01)).view(batch, groups)
    if task == "canny":
        pred_edges, target_edges = prediction > 0, target > 0
        if reference:
            counts = metrics.binary_confusion_counts(pred_edges.flatten(1), target_edges.flatten(1))
            scores["f1"] = metrics.f1_from_counts(*counts) * 100
        else:
            scores["f1"] = metrics.binary_f1(flat(pred_edges), flat(target_edges)).view(batch, groups) * 100
    return scores


def metrics_size(root_dir, row: int) -> tuple[int, int]:
    from PIL import Image

    with Image.open(annotation_path(root_dir, row)) as image:
        return image.size


def main(args=None):
    args = parse_args(args)
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    task, num_groups = config["task_name"], int(config["num_groups"])
    if task not in EDGE_TASKS:
        raise ValueError(f"{args.root_dir} holds a {task!r} run; eval_edge.py scores {EDGE_TASKS} "
                         "(depth: eval/eval_depth.py, segmentation: eval/eval_seg.py).")
    rows = require_complete(args.root_dir, config, generated=False, conditions=True)
    device = resolve_device(args.device)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, conditions=True), args.batch_size, args.num_workers)
    names = ["ms_ssim", "psnr"]
    if task == "canny":
        names.insert(0, "f1")
        size = min(metrics_size(args.root_dir, rows[0]))
        if size <= metrics.MS_SSIM_MIN_SIZE:
            # F1 is the canny metric; its MS-SSIM is secondary and undefined below 161 px.
            print(f"canny: MS-SSIM not computed: the images are {size} px, it needs more than "
                  f"{metrics.MS_SSIM_MIN_SIZE} px (5 scales of an 11x11 kernel). F1 and PSNR are.")
            names.remove("ms_ssim")
    # Reference scoring yields one value per prompt: a single bucket.
    means = {name: metrics.GroupedMean(1 if args.reference_scoring else num_groups) for name in names}
    for batch in tqdm(loader, desc=f"{task} scores"):
        scores = score_batch(task, batch["conditions"].to(device), batch["annotation"].to(device), args.reference_scoring)
        for name, values in scores.items():
            groups = torch.zeros_like(values, dtype=torch.long) if args.reference_scoring else \
                torch.arange(num_groups).expand_as(values)
            means[name].update(values.flatten(), groups.flatten())

    results = {
        "task": task,
        "benchmark": benchmark_name(config),
        "scoring": "reference" if args.reference_scoring else "default",
        "metrics": {name: mean.mean() for name, mean in means.items()},
        "per_group": {} if args.reference_scoring else {name: mean.per_group() for name, mean in means.items()},
        "num_rows": len(rows),
        "num_images": len(rows) * num_groups,
        "settings": {"f1_unit": "percent", "edge_threshold": "condition value > 0", "ms_ssim": "data_range 1, kernel 11, 5 scales",
                     "psnr_cap_db": metrics.PSNR_CAP_DB},
    }
    path = write_results(args.root_dir, "edge_reference" if args.reference_scoring else "edge", results)
    print({name: round(value, 4) for name, value in results["metrics"].items()}, f"({len(rows)} rows) -> {path}")
    return results


if __name__ == "__main__":
    main()
