"""Gather the results of every evaluated task into one table laid out like the paper's.

    python eval/summarize.py --run ControlNet=work_dirs/eval/base --run ControlNet++=work_dirs/eval/ours \
        --output work_dirs/eval/summary

Each ``--run NAME=DIR`` is searched recursively for evaluation folders (``eval_config.json`` +
``results.json``, written by eval/eval.py and the metric scripts); the task of each folder is
read from its results. Writes ``<output>.json`` and ``<output>.md`` and prints the Markdown:
one row per metric of the paper (controllability, FID per task, CLIP-score per task), the
paper's numbers for ControlNet v1.1 and ControlNet++, then for every run its **paper protocol**
score (the original release's computation, what the paper's numbers are comparable with) and
its **corrected** score (the original's defects fixed; see docs/FIDELITY.md). FID and
CLIP-score have one computation, shown in both groups.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import json
import math

from eval.common import CONFIG_NAME, RESULTS_NAME

# (row label, benchmark, results.json entry, metric key, paper ControlNet v1.1, paper ControlNet++)
# Paper numbers: ControlNet++ (ECCV 2024) camera-ready, Tables 1 and 2; the v1 arXiv
# segmentation numbers are in PAPER_V1.
ROWS = [
    ("ADE20K mIoU ↑", "ade20k", "segmentation", "miou", 32.55, 43.64),
    ("COCO-Stuff mIoU ↑", "cocostuff", "segmentation", "miou", 27.46, 34.56),
    ("Canny F1 ↑", "canny", "edge", "f1", 34.65, 37.04),
    ("HED SSIM ↑", "hed", "edge", "ms_ssim", 0.7621, 0.8097),
    ("LineArt SSIM ↑", "lineart", "edge", "ms_ssim", 0.7054, 0.8399),
    ("Depth RMSE ↓", "depth", "depth", "rmse", 35.90, 28.32),
    ("FID ADE20K ↓", "ade20k", "fid", "fid", 33.28, 29.49),
    ("FID COCO-Stuff ↓", "cocostuff", "fid", "fid", 21.33, 19.29),
    ("FID Canny ↓", "canny", "fid", "fid", 14.73, 18.23),
    ("FID HED ↓", "hed", "fid", "fid", 15.41, 15.01),
    ("FID LineArt ↓", "lineart", "fid", "fid", 17.44, 13.88),
    ("FID Depth ↓", "depth", "fid", "fid", 17.76, 16.66),
] + [(f"CLIP-score {name} ↑", benchmark, "clip", "clip_score", None, None)
     for name, benchmark in (("ADE20K", "ade20k"), ("COCO-Stuff", "cocostuff"), ("Canny", "canny"),
                             ("HED", "hed"), ("LineArt", "lineart"), ("Depth", "depth"))]
PAPER_V1 = {"ADE20K mIoU ↑": (27.46, 35.36), "COCO-Stuff mIoU ↑": (22.58, 33.17)}
# The paper-protocol entry of each metric script's results (the corrected one has the plain name).
PAPER_ENTRIES = {"edge": "edge_paper", "depth": "depth_paper", "segmentation": "segmentation_paper"}
SCORINGS = ("paper", "corrected")


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Summarise evaluation runs in the paper's layout.")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a named run: DIR holds one evaluation folder per task (repeat for several runs)")
    parser.add_argument("--output", default=None, help="write <output>.json and <output>.md (default: print only)")
    parser.add_argument("--reference_scoring", action="store_true",
                        help="accepted for older command lines: both scorings are always shown")
    args = parser.parse_args(args)
    runs = {}
    for spec in args.run:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--run takes NAME=DIR, got {spec!r}")
        if name in runs:
            parser.error(f"--run name {name!r} is given twice")
        if not Path(folder).is_dir():
            parser.error(f"--run {spec}: {folder} is not a folder")
        runs[name] = Path(folder)
    args.runs = runs
    return args


def collect(folder: Path) -> dict[str, dict]:
    """benchmark -> merged results.json of the evaluation folder that scored it."""
    found: dict[str, dict] = {}
    where: dict[str, Path] = {}
    for results_file in sorted(folder.rglob(RESULTS_NAME)):
        if not (results_file.parent / CONFIG_NAME).is_file():
            continue
        results = json.loads(results_file.read_text())
        benchmarks = {entry.get("benchmark") for entry in results.values() if isinstance(entry, dict)} - {None}
        for benchmark in benchmarks:
            if benchmark in found:
                raise ValueError(f"two evaluation folders of {benchmark!r} under {folder}: {where[benchmark].parent} "
                                 f"and {results_file.parent}; pass each with its own --run.")
            found[benchmark], where[benchmark] = results, results_file
    return found


def value_of(results: dict | None, entry: str, key: str, scoring: str) -> float | None:
    if results is None:
        return None
    if scoring == "paper" and entry in PAPER_ENTRIES:
        entry = PAPER_ENTRIES[entry]
    value = results.get(entry, {}).get("metrics", {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def summarize(runs: dict[str, Path]) -> dict:
    collected = {name: collect(folder) for name, folder in runs.items()}
    rows = []
    for label, benchmark, entry, key, paper_base, paper_ours in ROWS:
        row = {"metric": label, "benchmark": benchmark, "paper": {"ControlNet v1.1": paper_base, "ControlNet++": paper_ours},
               "runs": {scoring: {name: value_of(found.get(benchmark), entry, key, scoring)
                                  for name, found in collected.items()} for scoring in SCORINGS}}
        if label in PAPER_V1:
            row["paper_v1"] = dict(zip(("ControlNet v1.1", "ControlNet++"), PAPER_V1[label]))
        rows.append(row)
    return {"scorings": list(SCORINGS), "runs": {k: str(v) for k, v in runs.items()}, "rows": rows}


def fmt(value: float | None, label: str) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if "SSIM" in label else f"{value:.2f}"


def to_markdown(summary: dict) -> str:
    names = list(summary["runs"])
    header = ["Metric", "Paper ControlNet v1.1", "Paper ControlNet++",
              *(f"{n} (paper protocol)" for n in names), *(f"{n} (corrected)" for n in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        paper = [fmt(row["paper"][k], row["metric"]) for k in ("ControlNet v1.1", "ControlNet++")]
        if "paper_v1" in row:  # the arXiv v1 segmentation numbers, in brackets as in REFERENCE.md
            paper = [f"{p} ({fmt(row['paper_v1'][k], row['metric'])})" for p, k in zip(paper, ("ControlNet v1.1", "ControlNet++"))]
        ours = [fmt(row["runs"][scoring][n], row["metric"]) for scoring in SCORINGS for n in names]
        lines.append("| " + " | ".join([row["metric"], *paper, *ours]) + " |")
    lines.append("")
    lines.append("Paper protocol: the original release's computation on the same images (compare these with the "
                 "paper's columns). Corrected: its defects fixed (docs/FIDELITY.md). FID and CLIP-score are computed "
                 "once (FID on the generated images only; the original's folders also held the extracted maps, which "
                 "its clean-fid call counted). Brackets: the paper's v1 segmentation numbers. F1 and mIoU in percent, "
                 "SSIM = multi-scale SSIM, RMSE on the 0..255 scale.")
    return "\n".join(lines) + "\n"


def main(args=None):
    args = parse_args(args)
    summary = summarize(args.runs)
    markdown = to_markdown(summary)
    print(markdown)
    if args.output:
        from utils.io import atomic_write, save_json

        save_json(summary, f"{args.output}.json")
        atomic_write(f"{args.output}.md", lambda tmp: Path(tmp).write_text(markdown))
        print(f"-> {args.output}.json, {args.output}.md")
    return summary


if __name__ == "__main__":
    main()
