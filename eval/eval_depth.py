"""Controllability of the depth task (paper Table 1): RMSE between depth maps, 0..255 scale.

The evaluation depth model (DPT-Large, ``Intel/dpt-large``, as in the paper; a different model
from the DPT-Hybrid reward so the score is not the training objective) predicts the depth of
every generated image from transformers' ``DPTImageProcessor`` inputs (the original's call); the
prediction is compared with the input depth map (``annotations/<idx>.png``, written by eval.py as
the original wrote it: control_depth min-max normalised at full size, truncated, resized nearest).
Two scorings, both written to ``results.json``:

- ``depth_paper`` (the paper protocol, the original's computation, defect 4 included): the
  prediction divided by its max at the model's resolution, truncated to uint8 (``to_pil_image``),
  resized bilinearly by PIL to the image size; RMSE per image against the annotation, averaged.
  The label is min-max normalised but the prediction only max-normalised, so a prediction whose
  minimum is not 0 is compared on a shifted scale.
- ``depth`` (corrected): both maps are relative depth, defined up to scale and shift, so both
  are min-max normalised (prediction upsampled in float), then RMSE x 255.

    python eval/eval_depth.py --root_dir work_dirs/eval/depth/controlnet [--eval_model_name_or_path DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import (RowDataset, benchmark_name, full_float32, load_config, require_complete,
                         require_original_protocol, require_task_scored_here, resolve_device, reward_model,
                         row_loader, write_results)
from utils import metrics

DEFAULT_EVAL_MODEL = "Intel/dpt-large"


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Score a depth evaluation folder (RMSE).")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--eval_model_name_or_path", default=DEFAULT_EVAL_MODEL,
                        help="DPT depth model (hub id or local save_pretrained folder)")
    parser.add_argument("--reference_scoring", action="store_true",
                        help="accepted for older command lines: both scorings are always computed")
    parser.add_argument("--batch_size", type=int, default=8, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def dpt_processor(name_or_path: str):
    """transformers' DPTImageProcessor of the evaluation model (the original used DPT-Large's);
    a local folder without ``preprocessor_config.json`` gets the class defaults, which are DPT-Large's
    (384 x 384, bicubic, mean = std = 0.5)."""
    from transformers import DPTImageProcessor

    folder = Path(str(name_or_path)).expanduser()
    if folder.is_dir():
        if (folder / "preprocessor_config.json").is_file():
            return DPTImageProcessor.from_pretrained(str(folder), local_files_only=True)
        return DPTImageProcessor()
    return DPTImageProcessor.from_pretrained(str(name_or_path))


def paper_depth_maps(predicted: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) predicted depth -> (N, H, W) uint8 maps (``size`` = (W, H)) as the original's eval.py
    wrote them: ``to_pil_image(x / x.max())`` (truncation), then PIL's bilinear resize, read as grey."""
    import numpy as np
    from PIL import Image

    maps = []
    for depth in predicted.float().cpu():
        levels = (depth / depth.max()).mul(255).byte().numpy()
        image = Image.fromarray(levels).convert("RGB").resize(tuple(size), Image.BILINEAR)
        maps.append(torch.from_numpy(np.asarray(image.convert("L")).copy()))
    return torch.stack(maps)


def depth_rmse(prediction: torch.Tensor, label: torch.Tensor, paper: bool) -> torch.Tensor:
    """RMSE per image on the 0..255 scale of (N, H, W) maps.

    paper: prediction and label are the stored uint8 maps, compared as they are. Corrected:
    prediction is the raw depth upsampled in float, label the annotation; both min-max normalised.
    """
    if paper:  # the original's torch.sqrt(F.mse_loss(pred.float(), label.float())) per image, in float32
        squared = (prediction.float() - label.float()) ** 2
        return squared.flatten(1).mean(1).sqrt().double()
    return metrics.rmse(metrics.min_max_normalize(prediction) * 255, metrics.min_max_normalize(label.double()) * 255)


def main(args=None):
    args = parse_args(args)
    full_float32()
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    require_original_protocol(args.root_dir, config)
    require_task_scored_here(args.root_dir, config, "eval/eval_depth.py")
    num_groups = int(config["num_groups"])
    rows = require_complete(args.root_dir, config)
    device = resolve_device(args.device)
    # fp32 as the original (its DPT-Large ran in float32).
    dpt = reward_model("depth", args.eval_model_name_or_path, device).dpt
    processor = dpt_processor(args.eval_model_name_or_path)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, generated=True), args.batch_size, args.num_workers)
    corrected, paper = metrics.GroupedMean(num_groups), metrics.GroupedMean(num_groups)
    for batch in tqdm(loader, desc="depth RMSE"):
        generated = batch["generated"]  # (B, G, 3, H, W) uint8
        b, g, _, h, w = generated.shape
        # One forward per prompt on its G images, as the original's eval.py batched them: the model's
        # float rounding depends on the batch, and the paper protocol truncates to uint8 afterwards.
        predictions = []
        for row_images in generated:
            images = [Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())) for x in row_images]
            inputs = processor(images=images, return_tensors="pt")
            with torch.no_grad():
                predictions.append(dpt(pixel_values=inputs["pixel_values"].to(device, torch.float32)).predicted_depth)
        predicted = torch.cat(predictions)
        label = batch["annotation"][:, None].expand(b, g, h, w).reshape(b * g, h, w)
        groups = torch.arange(g).repeat(b)
        paper.update(depth_rmse(paper_depth_maps(predicted, (w, h)), label, paper=True), groups)
        upsampled = torch.nn.functional.interpolate(predicted[:, None].float(), size=(h, w), mode="bilinear",
                                                    align_corners=False)[:, 0]
        corrected.update(depth_rmse(upsampled.cpu(), label.float() / 255.0, paper=False), groups)

    common = {"task": "depth", "benchmark": benchmark_name(config), "num_rows": len(rows),
              "num_images": len(rows) * num_groups}
    results = {**common, "scoring": "corrected", "metrics": {"rmse": corrected.mean()},
               "per_group": {"rmse": corrected.per_group()},
               "settings": {"eval_model": args.eval_model_name_or_path,
                            "normalisation": "prediction (upsampled in float) and label both min-max"}}
    paper_results = {**common, "scoring": "paper", "metrics": {"rmse": paper.mean()},
                     "per_group": {"rmse": paper.per_group()},
                     "settings": {"eval_model": args.eval_model_name_or_path,
                                  "normalisation": "prediction / max at the model's resolution, truncated, PIL "
                                                   "bilinear resize; label min-max at full size, truncated, nearest"}}
    write_results(args.root_dir, "depth", results)
    path = write_results(args.root_dir, "depth_paper", paper_results)
    print(f"depth RMSE: paper protocol {paper.mean():.4f}, corrected {corrected.mean():.4f} ({len(rows)} rows) -> {path}")
    return {"corrected": results, "paper": paper_results}


if __name__ == "__main__":
    main()
