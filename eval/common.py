"""The evaluation folder: written by eval/eval.py, read by every metric script.

    <root>/eval_config.json                    settings of the generation run (eval.py writes it)
    <root>/images/group_<k>/<idx>.png           generation k (of --num_groups) for dataset row idx
    <root>/conditions/group_<k>/<idx>.png       the condition extracted from that generation, in
                                               the ControlNet input's format (what the annotator
                                               of the task returns for it); in a sibling folder so
                                               that images/group_<k>/ holds generations only and
                                               can be handed to any FID tool as it is (the
                                               original kept edge maps inside the group folders,
                                               where clean-fid counted them as generated images)
    <root>/annotations/<idx>.png               what the metric compares with: the input condition
                                               (canny / hed / lineart), the raw control_depth
                                               (depth), the class-index label with 255 = ignore
                                               (segmentation)
    <root>/visualization/<idx>.png             input condition | generations, real image | their
                                               extracted conditions
    <root>/results.json                        one entry per metric script

Rows are numbered by their index in the dataset split, so a row's files keep their names
whatever the number of processes. Every file is written atomically (utils/io.py): a file that
exists under its final name is complete.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CONFIG_NAME = "eval_config.json"
RESULTS_NAME = "results.json"

# Opt-in, in-process reuse across several evaluations (see ``enable_reuse``).
_REUSED: dict | None = None


def enable_reuse() -> None:
    """Let later evaluations in this process reuse what earlier ones built: the frozen pipeline
    parts, the annotator and evaluation models, the real images' conditions and FID statistics.
    For sweeps that evaluate many checkpoints of one setup in one process (toy/experiment.py);
    off by default, so a single evaluation keeps nothing in memory beyond its own run."""
    global _REUSED
    if _REUSED is None:
        _REUSED = {}


def reused(key: tuple, make):
    """``make()``, or with reuse enabled the value an earlier call with the same ``key`` made.
    The key must name everything the value depends on (paths, rows, resolution, dtype, device)."""
    if _REUSED is None:
        return make()
    if key not in _REUSED:
        _REUSED[key] = make()
    return _REUSED[key]


def reward_model(task: str, name: str, device, **kwargs):
    """``reward_models.build_reward_model``, reused across evaluations with reuse enabled: eval.py's
    annotator and eval_seg / eval_depth's evaluation model are one object when they are one model."""
    from reward_models import build_reward_model

    return reused(("reward-model", task, name, str(device), tuple(sorted(kwargs.items()))),
                  lambda: build_reward_model(task, name, device=device, **kwargs))


def generated_path(root: Path, group: int, row: int) -> Path:
    return Path(root) / "images" / f"group_{group}" / f"{row}.png"


def condition_path(root: Path, group: int, row: int) -> Path:
    return Path(root) / "conditions" / f"group_{group}" / f"{row}.png"


def annotation_path(root: Path, row: int) -> Path:
    return Path(root) / "annotations" / f"{row}.png"


def visualization_path(root: Path, row: int) -> Path:
    return Path(root) / "visualization" / f"{row}.png"


def row_files(root: Path, row: int, num_groups: int) -> list[Path]:
    """Every file of one row, in the order eval.py writes them (visualization last)."""
    files = [annotation_path(root, row)]
    for group in range(num_groups):
        files += [generated_path(root, group, row), condition_path(root, group, row)]
    return files + [visualization_path(root, row)]


def load_config(root: str | os.PathLike) -> dict:
    path = Path(root) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {root} is not an evaluation folder. Generate it first with "
            f"`python eval/eval.py --output_dir {root} ...` (or the eval/eval_<task>.sh launcher)."
        )
    return json.loads(path.read_text())


def full_float32() -> None:
    """Run float32 maths in float32 on GPUs (no TF32 matmuls / convolutions): the original's
    annotators and metrics ran on the CPU in float32, and the paper protocol truncates their maps
    to uint8, where a TF32 rounding becomes a whole level. The pipeline's fp16 is unaffected."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def require_original_protocol(root: str | os.PathLike, config: dict) -> None:
    """Refuse a folder whose conditions were not stored the original's way (eval.py before the paper
    protocol: soft canny maps, rounded line drawings, a raw depth label): scoring it as the paper
    protocol would print numbers the original never computed."""
    if config.get("condition_protocol") != "original":
        raise ValueError(f"{root} was generated by an older eval.py (its eval_config.json has no condition_protocol "
                         "'original'): its stored conditions and labels are not the original's, so neither scoring "
                         "applies. Generate it again with eval/eval.py into a new --output_dir.")


def benchmark_name(config: dict) -> str:
    """The paper's row a run belongs to: canny / hed / lineart / depth / ade20k / cocostuff."""
    from reward_models import reward_class

    return reward_class(config["task_name"]).benchmark_name(config["dataset_name"])


def require_task_scored_here(root: str | os.PathLike, config: dict, script: str) -> str:
    """The run's task, after checking that ``script`` (e.g. "eval/eval_depth.py") is the metric
    script of that task (its reward model's ``metric_script``)."""
    from reward_models import reward_class

    task = config["task_name"]
    scored_by = reward_class(task).metric_script
    if scored_by != script:
        raise ValueError(f"{root} holds a {task!r} run; {Path(script).name} does not score it ({scored_by} does).")
    return task


def _missing_message(folder: str, expected: list[Path], missing: list[Path], root: Path) -> str:
    shown = ", ".join(p.name for p in missing[:10]) + (", ..." if len(missing) > 10 else "")
    return (f"{folder} has {len(expected) - len(missing)} of {len(expected)} files: missing {shown}; re-run "
            f"eval/eval.py with the same --output_dir {root} (it generates only what is missing).")


def require_complete(root: str | os.PathLike, config: dict, generated: bool = True, conditions: bool = False) -> list[int]:
    """The rows of the run, after checking that each of their files needed for scoring exists.

    Raises FileNotFoundError naming, per folder, how many files are missing and which.
    """
    root = Path(root)
    rows = list(range(int(config["num_rows"])))
    checks = [("annotations", [annotation_path(root, r) for r in rows])]
    for group in range(int(config["num_groups"])):
        if generated:
            checks.append((f"images/group_{group}", [generated_path(root, group, r) for r in rows]))
        if conditions:
            checks.append((f"conditions/group_{group}", [condition_path(root, group, r) for r in rows]))
    problems = []
    for folder, expected in checks:
        missing = [p for p in expected if not p.is_file()]
        if missing:
            problems.append(_missing_message(folder, expected, missing, root))
    if problems:
        raise FileNotFoundError("incomplete evaluation folder:\n  " + "\n  ".join(problems))
    return rows


def read_png(path: Path, mode: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PNG as a uint8 tensor: (H, W) for mode "L", (3, H, W) for "RGB"."""
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode))
    if size is not None and array.shape[:2] != tuple(size):
        raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]} px but its annotation is "
                         f"{size[1]}x{size[0]} px; were they written by different eval.py runs?")
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor


class RowDataset(torch.utils.data.Dataset):
    """Row ``r`` -> {"row", "annotation" (H,W) uint8, "generated" (G,3,H,W) uint8,
    "conditions" (G,H,W) uint8}; only the parts asked for are read. For DataLoader workers."""

    def __init__(self, root, rows: list[int], num_groups: int, generated: bool = False, conditions: bool = False):
        self.root = Path(root)
        self.rows = list(rows)
        self.num_groups = num_groups
        self.generated = generated
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        annotation = read_png(annotation_path(self.root, row), "L")
        item = {"row": row, "annotation": annotation}
        size = tuple(annotation.shape)
        groups = range(self.num_groups)
        if self.generated:
            item["generated"] = torch.stack([read_png(generated_path(self.root, g, row), "RGB", size) for g in groups])
        if self.conditions:
            item["conditions"] = torch.stack([read_png(condition_path(self.root, g, row), "L", size) for g in groups])
        return item


def row_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int | None) -> torch.utils.data.DataLoader:
    """Batches of rows read by worker processes (default: one per CPU core, at most 4)."""
    if num_workers is None:
        num_workers = min(4, len(os.sched_getaffinity(0)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_results(root: str | os.PathLike, key: str, results: dict) -> Path:
    """Merge ``results`` into ``<root>/results.json`` under ``key`` (e.g. "edge", "fid", "clip").

    A lock file serialises metric scripts running at the same time on one folder; the JSON
    itself is replaced atomically, so a reader never sees half a file.
    """
    from utils.io import save_json

    root = Path(root)
    path = root / RESULTS_NAME
    with open(root / f".{RESULTS_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            merged = json.loads(path.read_text()) if path.is_file() else {}
            merged[key] = results
            save_json(merged, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
