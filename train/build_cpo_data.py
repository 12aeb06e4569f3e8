"""Build CPO's preference data: for every training row a winning and a losing condition.

CPO (Lyu et al., NeurIPS 2025, arXiv 2511.04753) contrasts *conditions* rather than images: the
winner c_w is the row's own condition, the loser c_l is the same task's annotator applied to an
image that a ControlNet generated from c_w, i.e. the condition the model actually followed. This
script makes both for any dataset the training scripts read:

    python train/build_cpo_data.py --task_name canny --dataset_name limingcv/MultiGen-20M_train \
        --dataset_split train --model_path work_dirs/reward_model/canny --output_dir work_dirs/cpo_data/canny
    accelerate launch --multi_gpu --num_processes 8 train/build_cpo_data.py ...   # rows shared by 8 GPUs

1. Generation is eval/eval.py's, on the training split with one image per row (`--num_groups 1`):
   the paper's sampler (UniPC, 20 steps, CFG 7.5, the negative prompt), one seeded generator per
   image, atomic files, resumable after a kill, rows shared by every process. Its folder is
   <output_dir>/generations/ (layout: eval/common.py); every eval.py flag is accepted here.
2. The main process then writes <output_dir>/dataset/ (``save_to_disk``): the source rows with two
   image columns added, CPO's layout: ``winner_<task>`` (the condition the ControlNet was given:
   the annotator's map of the real image for canny / hed / lineart, the row's condition column for
   depth / segmentation) and ``loser_<task>`` (the condition extracted from the generation, in the
   ControlNet input's format). Images are embedded, so the dataset does not depend on the
   generations folder; it is written under a temporary name and renamed when complete.

Train on it with `--objective cpo --conditioning_image_column winner_<task>` (train/cpo_<task>.sh);
the loser column is found by CPO's rule (``winner`` -> ``loser`` in the column name).
Which ControlNet generates: the one CPO fine-tunes (its launchers start from ControlNet++ weights),
so that the losers are that model's own mistakes; pass another with --model_path.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/, eval/

import argparse
import os
import shutil

DATASET_FOLDER = "dataset"
GENERATIONS_FOLDER = "generations"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every other flag is eval/eval.py's (--task_name, --dataset_name, --model_path, --sd_path, "
               "--resolution, --max_samples, --label_column, --reward_model_name_or_path, ...); see its --help.")
    parser.add_argument("--output_dir", required=True, help="generations/ and dataset/ are written inside")
    parser.add_argument("--dataset_split", default="train", help="the split to build preference pairs for")
    parser.add_argument("--winner_column", default=None, help="default: winner_<task> (CPO's MultiGen layout)")
    parser.add_argument("--loser_column", default=None, help="default: loser_<task>")
    args, rest = parser.parse_known_args(argv)
    if "--num_groups" in rest:
        parser.error("--num_groups is 1 here: one losing condition per row")
    return args, rest


def generation_argv(args, rest: list[str]) -> list[str]:
    """eval/eval.py's command line for the generation step (its checks and error messages apply)."""
    return [*rest, "--dataset_split", args.dataset_split, "--num_groups", "1",
            "--output_dir", str(Path(args.output_dir) / GENERATIONS_FOLDER)]


def build_dataset(gen, winner_column: str, loser_column: str, output_dir: Path) -> Path:
    """Write <output_dir>/dataset: the generated rows of the source split plus the two columns."""
    import datasets

    from eval.common import annotation_path, condition_path, require_complete
    from utils.data import load_dataset_any

    generations = Path(gen.output_dir)
    source = load_dataset_any(gen.dataset_name, gen.dataset_split, cache_dir=gen.cache_dir)
    num_rows = len(source) if gen.max_samples is None else min(gen.max_samples, len(source))
    # Every row generated and annotated: a clear error names what is missing.
    require_complete(generations, {"num_rows": num_rows, "num_groups": 1}, conditions=True)
    for column in (winner_column, loser_column):
        if column in source.column_names:
            raise ValueError(f"{gen.dataset_name} ({gen.dataset_split}) already has a column {column!r}; "
                             "pass another --winner_column / --loser_column.")
    source = source.select(range(num_rows))

    def read(path: Path) -> dict:
        return {"bytes": path.read_bytes(), "path": None}

    def add_pair(example, row):
        # Winner: what the ControlNet was given. Computed conditions (canny / hed / lineart) are
        # the stored annotation; depth / segmentation keep the row's own condition image.
        if gen.condition_column is None:
            winner = read(annotation_path(generations, row))
        else:
            winner = example[gen.condition_column]
        return {winner_column: winner, loser_column: read(condition_path(generations, 0, row))}

    features = source.features.copy()
    features[winner_column] = features[loser_column] = datasets.Image()
    if gen.condition_column is not None:
        source = source.cast_column(gen.condition_column, datasets.Image(decode=False))
        features[gen.condition_column] = datasets.Image(decode=False)
    pairs = source.map(add_pair, with_indices=True, features=features, desc="adding winner / loser conditions")
    if gen.condition_column is not None:
        pairs = pairs.cast_column(gen.condition_column, datasets.Image())
    final = output_dir / DATASET_FOLDER
    partial = output_dir / f".{DATASET_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    datasets.DatasetDict({gen.dataset_split: pairs}).save_to_disk(str(partial))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def main(argv=None) -> Path | None:
    args, rest = parse_args(argv)
    from eval import eval as generate

    gen_argv = generation_argv(args, rest)
    gen = generate.parse_args(gen_argv)
    winner_column = args.winner_column or f"winner_{gen.task_name}"
    loser_column = args.loser_column or f"loser_{gen.task_name}"
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    generate.main(gen_argv)  # returns on every process after its final barrier
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if not state.is_main_process:
        return None
    final = build_dataset(gen, winner_column, loser_column, Path(args.output_dir))
    print(f"CPO preference data: {final} (columns {winner_column}, {loser_column}; "
          f"train with --objective cpo --conditioning_image_column {winner_column})", flush=True)
    return final


if __name__ == "__main__":
    main()
