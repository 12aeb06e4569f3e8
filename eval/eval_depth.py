"""Controllability of the depth task (paper Table 1): RMSE between depth maps, 0..255 scale.

The evaluation depth model (DPT-Large, ``Intel/dpt-large``, as in the paper; a different model
from the DPT-Hybrid reward so the score is not the training objective) predicts the depth of
every generated image; the prediction is compared with the input depth map
(``annotations/<idx>.png``, the control_depth column at the generation resolution).

    python eval/eval_depth.py --root_dir work_dirs/eval/depth/controlnet [--eval_model_name_or_path DIR]

Both maps are relative (MiDaS-style inverse depth, defined up to scale and shift), so each is
normalised per image before the comparison:
- default: both min-max normalised to [0, 1], then x255, in float;
- --reference_scoring (the original release's eval, defect 4): the label min-max normalised but
  the prediction only divided by its max, both truncated to uint8 as its PNGs were. A
  prediction whose minimum is not 0 is then compared on a shifted scale.
RMSE per image, averaged over all images (and per group). Results go to ``results.json`` under
"depth" (or "depth_reference").
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import (RowDataset, benchmark_name, load_config, require_complete, resolve_device, reward_model,
                         row_loader, write_results)
from utils import metrics

DEFAULT_EVAL_MODEL = "Intel/dpt-large"


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Score a depth evaluation folder (RMSE).")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--eval_model_name_or_path", default=DEFAULT_EVAL_MODEL,
                        help="DPT depth model (hub id or local save_pretrained folder)")
    parser.add_argument("--reference_scoring", action="store_true",
                        help="normalise as the original release did (label min-max, prediction max only, uint8)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def depth_rmse(prediction: torch.Tensor, label: torch.Tensor, reference: bool) -> torch.Tensor:
    """RMSE per image on the 0..255 scale.

    prediction: (N, H, W) depth divided by its per-image max (the depth model's ``forward``);
    label: (N, H, W) raw input depth map in [0, 1].
    """
    label255 = metrics.min_max_normalize(label) * 255
    if reference:
        return metrics.rmse(torch.floor(prediction.double() * 255), torch.floor(label255))
    return metrics.rmse(metrics.min_max_normalize(prediction) * 255, label255)


def main(args=None):
    args = parse_args(args)
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    if config["task_name"] != "depth":
        raise ValueError(f"{args.root_dir} holds a {config['task_name']!r} run; eval_depth.py scores depth runs.")
    num_groups = int(config["num_groups"])
    rows = require_complete(args.root_dir, config)
    device = resolve_device(args.device)
    depth_model = reward_model("depth", args.eval_model_name_or_path, device)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, generated=True), args.batch_size, args.num_workers)
    rmse = metrics.GroupedMean(num_groups)
    for batch in tqdm(loader, desc="depth RMSE"):
        generated = batch["generated"].to(device)  # (B, G, 3, H, W) uint8
        b, g, _, h, w = generated.shape
        with torch.no_grad():
            prediction = depth_model(generated.view(b * g, 3, h, w).float() / 255.0)[:, 0]
        label = (batch["annotation"].to(device).float() / 255.0)[:, None].expand(b, g, h, w).reshape(b * g, h, w)
        rmse.update(depth_rmse(prediction, label, args.reference_scoring), torch.arange(g).repeat(b))

    results = {
        "task": "depth",
        "benchmark": benchmark_name(config),
        "scoring": "reference" if args.reference_scoring else "default",
        "metrics": {"rmse": rmse.mean()},
        "per_group": {"rmse": rmse.per_group()},
        "num_rows": len(rows),
        "num_images": len(rows) * num_groups,
        "settings": {"eval_model": args.eval_model_name_or_path,
                     "normalisation": "label min-max, prediction max (uint8)" if args.reference_scoring
                     else "label and prediction min-max (float)"},
    }
    path = write_results(args.root_dir, "depth_reference" if args.reference_scoring else "depth", results)
    print(f"depth RMSE {results['metrics']['rmse']:.4f} ({len(rows)} rows) -> {path}")
    return results


if __name__ == "__main__":
    main()
