"""Controllability of the segmentation task (paper Table 1): mIoU of the generated images.

An mmseg segmenter predicts the classes of every generated image; mIoU against the input
label map (``annotations/<idx>.png``, class indices with 255 = ignore) through mmseg's
IoUMetric functions. The paper's evaluation segmenters (not the reward models, so the score
is not the training objective):
- ADE20K: Mask2Former Swin-L, ``mask2former_swin-l-in22k-384x384-pre_8xb2-160k_ade20k-640x640``;
- COCO-Stuff: DeepLabV3-R101-d8, ``deeplabv3_r101-d8_4xb4-320k_coco-stuff164k-512x512``.

    python eval/eval_seg.py --root_dir work_dirs/eval/ade20k/controlnet \
        [--eval_model_name_or_path CONFIG_OR_FOLDER --eval_model_checkpoint FILE]

Segmentations come from mmseg's own test path (``SegmentationRewardModel.predict_mmseg``: the
config's test pipeline, data preprocessor and ``test_step``), as the original's ``mim test mmseg``.
The reported ``miou`` pools the areas of every image of every group, which is what that test over
the 4 groups' folders (one ConcatDataset) computed; ``per_group`` has the mIoU of each group.
Two scorings, both written to ``results.json``:

- ``segmentation_paper`` (the paper protocol): the original's test dataloaders resized every image
  with a keep-ratio scale of (2048, 512) for both segmenters (its Mask2Former config's own
  ``test_pipeline`` variable, 2560 x 640, was not the one its dataloader used), so 512 px images
  are segmented at 512 px.
- ``segmentation`` (corrected): each segmenter at its config's own test scale (Mask2Former-640
  sees 512 px images upsampled to 640, as it was trained and tested by mmseg).
When both scales give the same input size, the segmenter runs once.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse

import torch

from eval.common import (RowDataset, benchmark_name, full_float32, load_config, require_complete,
                         require_task_scored_here, resolve_device, reward_model, row_loader, write_results)
from reward_models.segmentation import keep_ratio_size
from utils import metrics

# The keep-ratio Resize scale of the original's test dataloaders (mmlab/mmseg/*.py of the release).
PAPER_TEST_SCALE = (2048, 512)
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
    parser.add_argument("--reference_scoring", action="store_true",
                        help="accepted for older command lines: both scorings are always computed")
    parser.add_argument("--batch_size", type=int, default=8, help="rows (prompts) per batch")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers reading PNGs (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


def main(args=None):
    args = parse_args(args)
    full_float32()
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    require_task_scored_here(args.root_dir, config, "eval/eval_seg.py")
    benchmark = benchmark_name(config)
    model_name = args.eval_model_name_or_path or EVAL_SEGMENTERS.get(benchmark)
    if model_name is None:
        raise ValueError(f"no default segmenter for dataset {config['dataset_name']}; pass --eval_model_name_or_path.")
    num_groups = int(config["num_groups"])
    rows = require_complete(args.root_dir, config)
    device = resolve_device(args.device)
    segmenter = reward_model("segmentation", model_name, device, checkpoint=args.eval_model_checkpoint,
                             label_format=config["label_format"])
    corrected = metrics.SegmentationAreas(segmenter.num_classes, num_groups)
    paper = metrics.SegmentationAreas(segmenter.num_classes, num_groups)
    loader = row_loader(RowDataset(args.root_dir, rows, num_groups, generated=True), args.batch_size, args.num_workers)
    for batch in tqdm(loader, desc="segmentation"):
        generated = batch["generated"]  # (B, G, 3, H, W) uint8
        b, g, _, h, w = generated.shape
        images = generated.view(b * g, 3, h, w).permute(0, 2, 3, 1).numpy()
        label = batch["annotation"].long()[:, None].expand(b, g, h, w).reshape(b * g, h, w)
        groups = torch.arange(g).repeat(b)
        paper_prediction = segmenter.predict_mmseg(images, test_scale=PAPER_TEST_SCALE)
        paper.update(paper_prediction, label, groups)
        same_input = segmenter.test_resize_scale is not None and \
            keep_ratio_size(h, w, segmenter.test_resize_scale) == keep_ratio_size(h, w, PAPER_TEST_SCALE)
        corrected.update(paper_prediction if same_input else segmenter.predict_mmseg(images), label, groups)

    common = {"task": "segmentation", "benchmark": benchmark, "num_rows": len(rows),
              "num_images": len(rows) * num_groups}
    settings = {"eval_model": model_name, "eval_model_checkpoint": args.eval_model_checkpoint,
                "num_classes": segmenter.num_classes, "miou": "percent, areas pooled over all groups"}
    results = {**common, "scoring": "corrected", "metrics": {"miou": corrected.miou()},
               "per_group": {"miou": corrected.per_group()},
               "settings": {**settings, "test_scale": segmenter.test_resize_scale}}
    paper_results = {**common, "scoring": "paper", "metrics": {"miou": paper.miou()},
                     "per_group": {"miou": paper.per_group()},
                     "settings": {**settings, "test_scale": PAPER_TEST_SCALE}}
    write_results(args.root_dir, "segmentation", results)
    path = write_results(args.root_dir, "segmentation_paper", paper_results)
    print(f"{benchmark} mIoU: paper protocol {paper.miou():.2f}, corrected {corrected.miou():.2f} "
          f"({len(rows)} rows) -> {path}")
    return {"corrected": results, "paper": paper_results}


if __name__ == "__main__":
    main()
