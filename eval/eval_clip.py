"""Text-image alignment (paper Table 2): CLIP-score of the generated images and their prompts.

torchmetrics' ``CLIPScore`` with CLIP ViT-B/16 (``openai/clip-vit-base-patch16``, as the
original): 100 x cosine similarity of the image and text embeddings, averaged over images (and
clamped at 0). One score per group; the reported score is their mean.

    python eval/eval_clip.py --root_dir work_dirs/eval/canny/controlnet [--clip_model_name_or_path DIR]

Prompts are read from the evaluated split (``--prompt_column`` of ``--dataset_name``, both from
eval_config.json by default; the first caption when a row has several, as eval.py used).
Results go to ``results.json`` under "clip".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import os

import torch

from eval.common import benchmark_name, generated_path, load_config, read_png, require_complete, resolve_device, write_results

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="CLIP-score of an evaluation folder.")
    parser.add_argument("--root_dir", required=True, help="the --output_dir of eval/eval.py")
    parser.add_argument("--clip_model_name_or_path", default=DEFAULT_CLIP, help="hub id or local CLIPModel folder")
    parser.add_argument("--dataset_name", default=None, help="default: the run's (eval_config.json)")
    parser.add_argument("--dataset_split", default=None, help="default: the run's")
    parser.add_argument("--prompt_column", default=None, help="default: the run's")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: up to 4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(args)


class GroupImages(torch.utils.data.Dataset):
    """(uint8 (3, H, W) image, row position) of one group, for DataLoader workers."""

    def __init__(self, root, group: int, rows: list[int]):
        self.paths = [generated_path(root, group, row) for row in rows]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_png(self.paths[i], "RGB"), i


def load_prompts(args, config: dict, rows: list[int]) -> list[str]:
    from utils.data import load_dataset_any

    dataset = load_dataset_any(args.dataset_name or config["dataset_name"], args.dataset_split or config["dataset_split"])
    column = args.prompt_column or config["prompt_column"]
    if column not in dataset.column_names:
        raise KeyError(f"the dataset has no prompt column {column!r} (--prompt_column); it has {dataset.column_names}.")
    prompts = dataset.select_columns([column]).select(rows)[column]
    return [p[0] if isinstance(p, (list, tuple)) else p for p in prompts]


class ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` (embedding in ``pooler_output``)
    where torchmetrics' CLIPScore expects the tensor that older versions returned.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_loader(name_or_path: str):
    """What CLIPScore calls to get (model, processor): any local folder or hub id. (Given a string,
    torchmetrics accepts only names containing "openai", so a local copy would be refused.)"""
    def load():
        from transformers import CLIPModel, CLIPProcessor

        local = Path(name_or_path).expanduser().is_dir()
        return (ProjectedFeatures(CLIPModel.from_pretrained(name_or_path, local_files_only=local).eval()),
                CLIPProcessor.from_pretrained(name_or_path, local_files_only=local))

    return load


def main(args=None):
    args = parse_args(args)
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm

    config = load_config(args.root_dir)
    rows = require_complete(args.root_dir, config)
    prompts = load_prompts(args, config, rows)
    device = resolve_device(args.device)
    metric = CLIPScore(model_name_or_path=clip_loader(args.clip_model_name_or_path)).to(device)
    num_workers = args.num_workers if args.num_workers is not None else min(4, len(os.sched_getaffinity(0)))
    per_group = []
    for group in range(int(config["num_groups"])):
        metric.reset()  # one streaming sum per group
        loader = torch.utils.data.DataLoader(GroupImages(args.root_dir, group, rows), batch_size=args.batch_size,
                                             num_workers=num_workers)
        for images, positions in tqdm(loader, desc=f"CLIP-score group_{group}"):
            metric.update(images.to(device), [prompts[p] for p in positions.tolist()])
        per_group.append(float(metric.compute()))

    results = {
        "task": config["task_name"],
        "benchmark": benchmark_name(config),
        "metrics": {"clip_score": sum(per_group) / len(per_group)},
        "per_group": {"clip_score": per_group},
        "num_rows": len(rows),
        "settings": {"clip_model": args.clip_model_name_or_path},
    }
    path = write_results(args.root_dir, "clip", results)
    print(f"CLIP-score {results['metrics']['clip_score']:.4f} (groups {[round(c, 3) for c in per_group]}) -> {path}")
    return results


if __name__ == "__main__":
    main()
