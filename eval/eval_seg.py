"""Controllability of the segmentation task (paper Table 1): mIoU of the generated images.

An mmseg segmenter predicts the classes of every generated image; mIoU against the input
label map (``annotations/<idx>.png``, class indices with 255 = ignore) through mmseg's
IoUMetric functions. The paper's evaluation segmenters (not the reward models, so the score
is not the training objective):
- ADE20K: Mask2Former Swin-L, ``mask2former_swin-l-in22k-384x384-pre_8xb2-160k_ade20k-640x640``;
- COCO-Stuff: DeepLabV3-R101-d8, ``deeplabv3_r101-d8_4xb4-320k_coco-stuff164k-512x512``.

    python eval/eval_seg.py --root_dir work_dirs/eval/ade20k/controlnet \
        [--eval_model_name_or_path CONFIG_OR_FOLDER --eval_model_checkpoint FILE]

The reported ``miou`` pools the areas of every image of every group, which is what the
original's ``mim test mmseg`` over the 4 groups' folders (one ConcatDataset) computed;
``per_group`` has the mIoU of each group. --reference_scoring changes nothing here (the
protocol had no defect) and is accepted so that every metric script takes the same flags.
Results go to ``results.json`` under "segmentation".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import (RowDataset, benchmark_name, load_config, require_complete, resolve_device, reward_model,
                         row_loader, write_results)
from utils import metrics

EVAL_SEGMENTERS = {
    "ade20k": "mmseg::mask2former/mask2former_swin-l-in22k-384x384-pre_8xb2-160k_ade20k-640x640.py",
    "cocostuff": "mmseg::deeplabv3/deeplabv3_r101-d8_4xb4-320k_coco-stuff164k-512x512.py",
}


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Score a segmentation evaluation folder (mIoU).")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--eval_model_name_or_path", default=None,
                        help=f"mmseg config (mmseg::... name or file) or a folder with config.py + model.pth; "
                             f"default: the paper's segmenter for the dataset {EVAL_SEGMENTERS}")
    parser.add_argument("--eval_model_checkpoint", default=None,
                        help="checkpoint path or URL (default: the model zoo's, for mmseg:: configs)")
    parser.add_argument("--reference_scoring", action="store_true", help="accepted; segmentation scoring is the same")
    parser.add_argument("--batch_size", type=int, default=8, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def main(args=None):
    args = parse_args(args)
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    if config["task_name"] != "segmentation":
        raise ValueError(f"{args.root_dir} holds a {config['task_name']!r} run; eval_seg.py scores segmentation runs.")
    benchmark = benchmark_name(config)
    model_name = args.eval_model_name_or_path or EVAL_SEGMENTERS.get(benchmark)
    if model_name is None:
        raise ValueError(f"no default segmenter for dataset {config['dataset_name']}; pass --eval_model_name_or_path.")
    num_groups = int(config["num_groups"])
    rows = require_complete(args.root_dir, config)
    device = resolve_device(args.device)
    segmenter = reward_model("segmentation", model_name, device, checkpoint=args.eval_model_checkpoint,
                             label_format=config["label_format"])
    areas = metrics.SegmentationAreas(segmenter.num_classes, num_groups)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, generated=True), args.batch_size, args.num_workers)
    for batch in tqdm(loader, desc="segmentation"):
        generated = batch["generated"].to(device)  # (B, G, 3, H, W) uint8
        b, g, _, h, w = generated.shape
        prediction = segmenter.predict(generated.view(b * g, 3, h, w).float() / 255.0)
        label = batch["annotation"].to(device).long()[:, None].expand(b, g, h, w).reshape(b * g, h, w)
        areas.update(prediction, label, torch.arange(g).repeat(b))

    results = {
        "task": "segmentation",
        "benchmark": benchmark,
        "scoring": "reference" if args.reference_scoring else "default",
        "metrics": {"miou": areas.miou()},
        "per_group": {"miou": areas.per_group()},
        "num_rows": len(rows),
        "num_images": len(rows) * num_groups,
        "settings": {"eval_model": model_name, "eval_model_checkpoint": args.eval_model_checkpoint,
                     "num_classes": segmenter.num_classes, "miou": "percent, areas pooled over all groups"},
    }
    path = write_results(args.root_dir, "segmentation", results)
    print(f"{benchmark} mIoU {results['metrics']['miou']:.2f} ({len(rows)} rows) -> {path}")
    return results


if __name__ == "__main__":
    main()
