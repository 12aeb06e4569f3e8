"""The paper's table at toy scale: ControlNet vs ControlNet++ vs Ctrl-U (and CPO), six tasks, three seeds.

    python -m toy.experiment                            # the whole experiment (see README)
    python -m toy.experiment --variants controlnet controlnet_pp ctrl_u cpo   # with CPO's row
    python -m toy.experiment --pretrain                 # pretrain the world here instead (~1 hour)
    python -m toy.experiment --size long --out work_dirs/toy-experiment-long   # 3x longer runs
    python -m toy.experiment --size small --toy T --pretrained P --out O   # the fast test's size

What it does, resuming whatever a previous run already finished (every stage skips outputs that
are complete, so an interrupted run continues where it stopped; ``<out>/experiment.json`` records
the settings, and a folder made with other settings is refused rather than silently reused):

1. The pretrained toy world: the one shipped in ``toy/weights`` (``python -m toy.committed``,
   seconds), or with ``--pretrain`` an f4 toy world (``python -m toy.world --architecture f4``)
   pretrained here (``python -m toy.pretrain``): VAE, text-to-image UNet with its text encoder,
   and the learned reward models, trained on the toy data.
2. Baselines, our "ControlNet v1.1": one toy ControlNet per task trained from the UNet with the
   plain diffusion loss by ``train/train_controlnet.py``, into ``<pretrained>/controlnets/<task>``
   (the shipped world has them: nothing to train).
3. From each baseline and for each seed, the same number of steps with the same data and seed:
   - ControlNet:   diffusion loss only (``--grad_scale 0``: the reward is still computed, without
                   gradient, so that its curve can be compared),
   - ControlNet++: diffusion + reward loss,
   - Ctrl-U:       diffusion + uncertainty-weighted reward (``--uncertainty_weighting``, window
                   t <= 400, reward weight ramped up over the first fifth of the steps),
   the three through the task's launcher ``train/reward_<task>.sh`` with toy paths, and, with
   ``--variants ... cpo``,
   - CPO:          CPO's preference loss (``train/cpo_<task>.sh``, its own grad_scale, beta and
                   margin), on preference data built from the baseline by
                   ``train/build_cpo_data.py`` (losers: conditions extracted from the baseline's
                   generations of the training rows, UniPC at the evaluation's step count).
4. Evaluation with ``eval/`` (the same code as eval/eval_<task>.sh, called in-process to save a
   Python start per stage; a task's evaluation starts as soon as its runs are done, while the next
   task trains) on the toy validation split: the task's controllability metric (depth and
   segmentation scored by the world's evaluation models, not by the rewarding ones, as in the
   paper; an evaluation is redone when its scorer's files changed) and FID
   with the toy world's Inception-shaped feature extractor; for seed 0 also at the intermediate
   checkpoints. The **oracle**, the real validation images scored the same way
   (``eval/eval.py --model oracle``), is the metric's ceiling.
5. ``<out>/table.md`` and ``<out>/results.json`` (mean and spread over seeds; each variant's
   difference from diffusion-only fine-tuning marked when larger than 2 standard errors), plots
   of the reward loss over training steps and of the metric over steps, and a grid of samples.

Toy-scale settings that differ from the paper's, and why (all in TOY_SETTINGS / SIZES below):
64 px, batch 16, lr 1e-3 without warm-up (tiny models trained for 150 steps, or 450 with --size
long, instead of SD1.5 at 1e-5 for 10k steps); the paper's grad_scale of each task times TOY_GRAD_SCALE_FACTOR (the toy
reward losses are small next to the toy diffusion loss: with the paper's weight alone canny F1
moved by +0.1, with 10x by +1.1 in a pilot run); no gradient checkpointing (tiny models). HED and
line drawing are scored by MS-SSIM, which needs images of at least 176 px: they are generated at 64 px
and upsampled to 192 px (eval.py --generation_resolution) before their maps are extracted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
VARIANTS = ("controlnet", "controlnet_pp", "ctrl_u", "cpo")
DEFAULT_VARIANTS = ("controlnet", "controlnet_pp", "ctrl_u")  # the paper's comparison; CPO with --variants
VARIANT_NAMES = {"start": "baseline (start)", "controlnet": "ControlNet", "controlnet_pp": "ControlNet++",
                 "ctrl_u": "Ctrl-U", "cpo": "CPO"}
REFERENCE_VARIANT = "controlnet"  # every other variant is compared with diffusion-only fine-tuning
ORACLE_NAME = "oracle"  # the real validation images, scored as generations are (the metric's ceiling)
REWARD_VARIANTS = ("controlnet", "controlnet_pp", "ctrl_u")  # trained by train/reward_<task>.sh
TOY_GRAD_SCALE_FACTOR = 10.0
BASELINE_NAME = "start"


@dataclass(frozen=True)
class ToyTask:
    """How one task of the paper's Table 1 trains and evaluates in the toy world."""

    launcher: str  # train/<launcher>.sh
    train_dataset: str
    caption_column: str
    reward_model: str  # path inside the pretrained world, or "canny"
    baseline_condition: tuple[str, ...]  # train_controlnet.py flags giving the condition
    eval_task: str
    eval_dataset: str
    eval_split: str
    eval_flags: tuple[str, ...]
    metric_script: str  # eval/<script>.py
    metric: tuple[str, str]  # results.json entry (the paper-protocol scoring), metric name
    metric_label: str
    higher_is_better: bool
    eval_resolution: int = 64
    generation_resolution: int | None = None
    # The scorer inside the world, another network than the reward's, as the paper scores depth
    # with DPT-Large (rewards with DPT-Hybrid) and segmentation with Mask2Former / DeepLabV3-R101
    # (rewards with UperNet / DeepLabV3-R50): reward_models/dpt-large and reward_models/*_seg_eval.
    eval_model: str | None = None


def _edge(name: str, launcher: str, reward_model: str, metric: tuple[str, str], label: str, **kw) -> ToyTask:
    detector = ("--condition_detector", name) + (() if reward_model == "canny" else ("--condition_detector_path",
                                                                                      "{world}/" + reward_model))
    return ToyTask(launcher, "MultiGen-20M_train", "text", reward_model, detector, name, "MultiGen-20M_canny_eval",
                   "validation", ("--prompt_column", "text"), "eval_edge", metric, label, True, **kw)


def _segmentation(launcher: str, dataset: str, label_column: str, model: str) -> ToyTask:
    return ToyTask(launcher, dataset, "prompt", f"reward_models/{model}", ("--conditioning_image_column", "control_seg"),
                   "segmentation", dataset, "validation",
                   ("--prompt_column", "prompt", "--condition_column", "control_seg", "--label_column", label_column),
                   "eval_seg", ("segmentation_paper", "miou"), "mIoU", True, eval_model=f"reward_models/{model}_eval")


TASKS: dict[str, ToyTask] = {
    "ade20k": _segmentation("reward_ade20k", "Captioned_ADE20K", "seg_map", "ade20k_seg"),
    "cocostuff": _segmentation("reward_cocostuff", "Captioned_COCOStuff", "panoptic_seg_map", "cocostuff_seg"),
    "canny": _edge("canny", "reward_canny", "canny", ("edge_paper", "f1"), "F1"),
    "hed": _edge("hed", "reward_hed", "reward_models/ControlNetHED.pth", ("edge_paper", "ms_ssim"), "SSIM",
                 eval_resolution=192, generation_resolution=64),
    "lineart": _edge("lineart", "reward_linedrawing", "reward_models/lineart/model.pth", ("edge_paper", "ms_ssim"), "SSIM",
                     eval_resolution=192, generation_resolution=64),
    "depth": ToyTask("reward_depth", "MultiGen-20M_depth", "text", "reward_models/dpt-hybrid-midas",
                     ("--conditioning_image_column", "control_depth"), "depth", "MultiGen-20M_depth_eval", "validation",
                     ("--prompt_column", "text", "--condition_column", "control_depth", "--label_column",
                      "control_depth"), "eval_depth", ("depth_paper", "rmse"), "RMSE", False,
                     eval_model="reward_models/dpt-large"),
}


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    steps: int  # fine-tuning steps of every variant
    baseline_steps: int
    eval_rows: int | None  # None: the whole validation split
    eval_groups: int
    eval_inference_steps: int
    pretrain_budget: str
    metric_points: int = 3  # seed 0 is also evaluated at steps/points, 2*steps/points, ...
    grad_scale_factor: float = TOY_GRAD_SCALE_FACTOR
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    architecture: str = "f4"  # the toy world's (toy/world.py ARCHITECTURES)
    train_flags: tuple[str, ...] = ()  # appended to every fine-tuning run (investigations)


SIZES = {
    # The default: the paper's table at toy scale on the shipped f4 world, 150 steps per run, 64
    # validation rows x 1 image, three variants x three seeds (docs/TOY_EXPERIMENT.md has the time).
    "full": Size(seeds=(0, 1, 2), steps=150, baseline_steps=2000, eval_rows=None, eval_groups=1,
                 eval_inference_steps=10, pretrain_budget="full", metric_points=2),
    # Longer runs, two images per validation row (FID over 128).
    "long": Size(seeds=(0, 1, 2), steps=450, baseline_steps=2000, eval_rows=None, eval_groups=2,
                 eval_inference_steps=10, pretrain_budget="full", metric_points=3),
    # The fast test: every stage and file, on the 24-row test world, in about two minutes.
    "small": Size(seeds=(0, 1), steps=3, baseline_steps=4, eval_rows=4, eval_groups=1, eval_inference_steps=2,
                  pretrain_budget="small", architecture="f8", variants=VARIANTS),
}
# What a finished output folder was made with must match a run that reuses it (experiment.json).
REUSED_SETTINGS = ("steps", "eval_rows", "eval_groups", "eval_inference_steps", "grad_scale_factor", "train_flags",
                   "metric_points")
# The fine-tuning settings shared by every variant (the launchers' other paper settings stay:
# AdamW betas/wd/eps, max grad norm 1, EMA, the reward window 0..200, the seed flag).
TOY_SETTINGS = ("--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--no-gradient_checkpointing",
                "--report_to", "none", "--num_validation_images", "1", "--num_validation_inference_steps", "10",
                "--num_validation_rows", "4")
BASELINE_SETTINGS = ("--resolution", "64", "--train_batch_size", "16", "--learning_rate", "1e-3",
                     "--lr_scheduler", "cosine", "--lr_warmup_steps", "20", "--seed", "0", "--report_to", "none",
                     "--num_validation_images", "1", "--num_validation_inference_steps", "10",
                     "--num_validation_rows", "4")


# ---------------------------------------------------------------------------------------------
# Jobs: subprocesses, a few at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    done: callable = None  # called after success (e.g. to move a finished folder into place)
    after: tuple[str, ...] = ()  # names of jobs that must finish first (absent ones count as done)


def run_jobs(jobs: list[Job], parallel: int) -> None:
    """Run ``jobs`` ``parallel`` at a time (one thread each), each as soon as the jobs it comes
    ``after`` have finished, in list order otherwise; stop at the first failure with its log."""
    pending, running, finished = list(jobs), [], set()
    names = {job.name for job in jobs}
    while pending or running:
        while len(running) < parallel:
            job = next((j for j in pending if all(d in finished or d not in names for d in j.after)), None)
            if job is None:
                if not running:  # nothing runs and nothing can start: a dependency cycle
                    raise RuntimeError(f"jobs wait for each other: {[(j.name, j.after) for j in pending]}")
                break
            pending.remove(job)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                   "PYTHONPATH": str(REPO_ROOT), **job.env}
            handle = open(job.log, "w")
            process = subprocess.Popen(job.command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running.append((job, process, handle, time.perf_counter()))
        time.sleep(0.2)
        for entry in list(running):
            job, process, handle, start = entry
            if process.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            if process.returncode != 0:
                for _, other, other_handle, _ in running:
                    other.kill()
                    other_handle.close()
                tail = job.log.read_text()[-4000:]
                raise RuntimeError(f"{job.name} failed (exit {process.returncode}); log {job.log}:\n{tail}")
            if job.done is not None:
                job.done()
            finished.add(job.name)
            print(f"  done {job.name} ({time.perf_counter() - start:.0f} s)", flush=True)


def _python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def ensure_worlds(args, size: Size) -> Path:
    """The pretrained toy world: kept if present; else the shipped one (toy/weights, seconds) when it
    was made with this size's budget and architecture, unless --pretrain; else pretrained here from
    a random world (about an hour for the full budget)."""
    from toy import committed
    from toy.pretrain import pretrain_toy_world
    from toy.world import MANIFEST_NAME, make_toy_world, missing_reward_models

    pretrained = Path(args.pretrained)
    if (pretrained / MANIFEST_NAME).is_file():
        missing = missing_reward_models(json.loads((pretrained / MANIFEST_NAME).read_text()))
        if missing:
            raise SystemExit(f"{pretrained} is a toy world made before it had {', '.join(missing)} (the evaluation "
                             f"segmenters were added on 2026-12-07, the evaluation DPT on 2026-12-08). `python -m toy.committed --out {pretrained}` "
                             "replaces it with the shipped world (baselines included); or pass another --pretrained.")
        return pretrained
    shipped = committed.BUNDLE / MANIFEST_NAME
    if not args.pretrain and shipped.is_file():
        manifest = json.loads(shipped.read_text())
        if (manifest["pretrained"]["budget"], manifest.get("architecture", "f8")) == (size.pretrain_budget, size.architecture):
            print(f"== the shipped pretrained toy world (toy/weights) -> {pretrained}", flush=True)
            committed.restore(pretrained)
            return pretrained
    print(f"== toy world ({size.architecture}) -> {args.toy}, then pretraining ({size.pretrain_budget}) -> {pretrained}",
          flush=True)
    make_toy_world(args.toy, architecture=size.architecture)
    pretrain_toy_world(args.toy, pretrained, budget=size.pretrain_budget)
    return pretrained


def baseline_dir(world: Path, task: str) -> Path:
    return world / "controlnets" / task


def is_trained(folder: Path) -> bool:
    """A finished training run: its final ControlNet is written last."""
    return (folder / "diffusion_pytorch_model.safetensors").is_file() and (folder / "config.json").is_file()


def baseline_jobs(world: Path, tasks: list[str], size: Size, logs: Path) -> list[Job]:
    """Our "ControlNet v1.1": train/train_controlnet.py from the UNet-initialised toy ControlNet."""
    jobs = []
    for task in tasks:
        spec, final = TASKS[task], baseline_dir(world, task)
        if is_trained(final):
            continue
        tmp = final.parent / f".{task}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        condition = [flag.format(world=world) for flag in spec.baseline_condition]
        command = [_python(), "train/train_controlnet.py",
                   "--pretrained_model_name_or_path", str(world / "toy-sd15"),
                   "--controlnet_model_name_or_path", str(world / "toy-controlnet"),
                   "--dataset_name", str(world / "datasets" / spec.train_dataset),
                   "--caption_column", spec.caption_column, *condition, *BASELINE_SETTINGS,
                   "--max_train_steps", str(size.baseline_steps), "--checkpointing_steps", str(size.baseline_steps),
                   "--validation_steps", str(size.baseline_steps), "--output_dir", str(tmp)]

        def move(tmp=tmp, final=final):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

        jobs.append(Job(f"baseline {task}", command, {"ACCELERATE_USE_CPU": "1"}, logs / f"baseline_{task}.log", move))
    return jobs


def cpo_data_dir(out: Path, task: str) -> Path:
    return out / "cpo_data" / task


def cpo_data_jobs(world: Path, out: Path, tasks: list[str], size: Size, logs: Path) -> list[Job]:
    """CPO's winner / loser conditions of each task's training split, generated by its baseline."""
    jobs = []
    for task in tasks:
        spec, folder = TASKS[task], cpo_data_dir(out, task)
        if (folder / "dataset" / "dataset_dict.json").is_file():
            continue
        annotator = "canny" if spec.reward_model == "canny" else str(world / spec.reward_model)
        columns = ["--winner_column", "winner", "--loser_column", "loser"] if spec.eval_task == "segmentation" else []
        command = [_python(), "train/build_cpo_data.py", "--task_name", spec.eval_task,
                   "--dataset_name", str(world / "datasets" / spec.train_dataset), "--model_path",
                   str(baseline_dir(world, task)), "--sd_path", str(world / "toy-sd15"), "--resolution", "64",
                   "--batch_size", "64", "--num_inference_steps", str(size.eval_inference_steps),
                   "--reward_model_name_or_path", annotator, "--output_dir", str(folder), *spec.eval_flags, *columns]
        if size.eval_rows:  # the small size: as many rows as a few batches need
            command += ["--max_samples", str(4 * size.eval_rows)]
        jobs.append(Job(f"cpo data {task}", command, {}, logs / f"cpo_data_{task}.log", after=(f"baseline {task}",)))
    return jobs


def paper_grad_scale(launcher: str) -> float:
    """The launcher's own --grad_scale (paper Table 8): the launchers stay the one source of it."""
    text = (REPO_ROOT / "train" / f"{launcher}.sh").read_text()
    match = re.search(r"--grad_scale\s+([0-9.]+)", text)
    if match is None:
        raise ValueError(f"train/{launcher}.sh passes no --grad_scale")
    return float(match.group(1))


def run_dir(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / "runs" / task / variant / f"seed{seed}"


def variant_flags(variant: str, grad_scale: float, steps: int, factor: float = TOY_GRAD_SCALE_FACTOR) -> list[str]:
    if variant == "cpo":  # CPO's launcher carries its own grad_scale, beta and margin
        return []
    if variant == "controlnet":
        return ["--grad_scale", "0"]
    flags = ["--grad_scale", f"{grad_scale * factor:g}"]
    if variant == "ctrl_u":  # Ctrl-U (REFERENCE): per-pixel exp(-U), + mean U, warm-up, window t <= 400
        flags += ["--uncertainty_weighting", "--max_timestep_rewarding", "400",
                  "--reward_warmup_steps", str(max(1, steps // 5))]
    return flags


def checkpoint_steps(size: Size) -> list[int]:
    every = max(1, size.steps // size.metric_points)
    return [s for s in range(every, size.steps, every)]


def finetune_jobs(world: Path, out: Path, tasks: list[str], size: Size) -> list[Job]:
    """Task by task (so that a task's evaluation can start while the next one trains)."""
    jobs, intermediate = [], checkpoint_steps(size)
    for task in tasks:
        spec = TASKS[task]
        reward = "canny" if spec.reward_model == "canny" else str(world / spec.reward_model)
        for seed in size.seeds:
            first = seed == size.seeds[0]
            for variant in size.variants:
                folder = run_dir(out, task, variant, seed)
                if is_trained(folder):
                    continue
                # Seed 0 keeps intermediate checkpoints for the metric-over-steps plot and writes the
                # launcher's validation grid at the end; the other seeds write neither (not used here).
                never = size.steps + 1
                every = (intermediate[0] if intermediate else size.steps) if first else never
                env = {"SD_PATH": str(world / "toy-sd15"), "CONTROLNET_PATH": str(baseline_dir(world, task)),
                       "REWARD_MODEL_PATH": reward, "DATASET": str(world / "datasets" / spec.train_dataset),
                       "OUTPUT_DIR": str(folder), "NUM_PROCESSES": "1", "MIXED_PRECISION": "no", "RESOLUTION": "64",
                       "TRAIN_BATCH_SIZE": "16", "GRAD_ACCUM": "1", "MAX_TRAIN_STEPS": str(size.steps),
                       "CHECKPOINTING_STEPS": str(every), "VALIDATION_STEPS": str(size.steps if first else never),
                       "NUM_WORKERS": "0"}
                launcher, after = f"train/{spec.launcher}.sh", (f"baseline {task}",)
                if variant == "cpo":  # its preference data; CPO's launchers read CPO's caption column name
                    launcher, after = f"train/cpo_{task}.sh", (*after, f"cpo data {task}")
                    env["DATASET"] = str(cpo_data_dir(out, task) / "dataset")
                command = ["bash", launcher, *TOY_SETTINGS, "--seed", str(seed),
                           *variant_flags(variant, paper_grad_scale(spec.launcher), size.steps, size.grad_scale_factor),
                           *(("--caption_column", spec.caption_column) if variant == "cpo" else ()), *size.train_flags]
                jobs.append(Job(f"{task} {variant} seed {seed}", command, env, folder.parent / f"seed{seed}.log",
                                after=after))
    return jobs


def models_to_evaluate(world: Path, out: Path, task: str, size: Size) -> dict[str, Path]:
    """name -> ControlNet folder: the baseline, every run, seed 0's intermediate checkpoints."""
    models = {ORACLE_NAME: None, BASELINE_NAME: baseline_dir(world, task)}
    for variant in size.variants:
        for seed in size.seeds:
            models[f"{variant}/seed{seed}"] = run_dir(out, task, variant, seed)
        for step in checkpoint_steps(size):
            models[f"{variant}/seed{size.seeds[0]}/step{step}"] = (run_dir(out, task, variant, size.seeds[0])
                                                                   / f"checkpoint-{step}" / "controlnet")
    return models


SCORER_STAMP = "scorer.json"


def scorer_digest(world: Path, task: str) -> dict | None:
    """The task's scorer inside the world and a SHA-256 of its files (None: scored by the reward's
    own detector): a scorer replaced in place, e.g. by a newer toy/weights restored to the same
    folder, gives another digest, and the evaluations it scored are redone (the runs are kept)."""
    relative = TASKS[task].eval_model
    if not relative:
        return None
    folder = Path(world) / relative
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return {"model": relative, "sha256": digest.hexdigest()}


def is_evaluated(root: Path, metric_entry: str, scorer: dict | None) -> bool:
    """``root`` holds the metric and FID, scored by ``scorer`` (its stamp, written after scoring)."""
    results, stamp = root / "results.json", root / SCORER_STAMP
    if not (results.is_file() and {metric_entry, "fid"} <= set(json.loads(results.read_text()))):
        return False
    return (json.loads(stamp.read_text()) if stamp.is_file() else None) == scorer


def evaluate_task(world: Path, out: Path, task: str, size: Size) -> None:
    """Every model of one task through eval/ (generation, controllability, FID), in this process."""
    from eval import eval as generate
    from eval import eval_depth, eval_edge, eval_fid, eval_seg
    from eval.common import enable_reuse

    enable_reuse()  # the frozen parts, annotators, real conditions and real FID statistics: once per task

    spec = TASKS[task]
    scorers = {"eval_edge": eval_edge, "eval_depth": eval_depth, "eval_seg": eval_seg}
    scorer = scorer_digest(world, task)
    for name, model in models_to_evaluate(world, out, task, size).items():
        root = out / "eval" / task / name
        if is_evaluated(root, spec.metric[0], scorer):
            continue
        annotator = "canny" if spec.reward_model == "canny" else str(world / spec.reward_model)
        flags = ["--task_name", spec.eval_task, "--dataset_name", str(world / "datasets" / spec.eval_dataset),
                 "--dataset_split", spec.eval_split, "--sd_path", str(world / "toy-sd15"),
                 *(("--model", "oracle") if model is None else ("--model_path", str(model))),
                 "--output_dir", str(root), "--resolution", str(spec.eval_resolution), "--batch_size", "64",
                 "--num_inference_steps", str(size.eval_inference_steps), "--num_groups", str(size.eval_groups),
                 "--reward_model_name_or_path", annotator, *spec.eval_flags]
        if spec.generation_resolution:
            flags += ["--generation_resolution", str(spec.generation_resolution)]
        if size.eval_rows:
            flags += ["--max_samples", str(size.eval_rows)]
        generate.main(flags)
        score = ["--root_dir", str(root), "--num_workers", "0"]
        if spec.eval_model:
            score += ["--eval_model_name_or_path", str(world / spec.eval_model)]
        scorers[spec.metric_script].main(score)
        eval_fid.main(["--root_dir", str(root), "--inception_path", str(world / "fid" / "inception-toy.pt"),
                       "--num_workers", "0"])
        if scorer is not None:
            (root / SCORER_STAMP).write_text(json.dumps(scorer, indent=2) + "\n")


def evaluation_job(world: Path, out: Path, task: str, args, size: Size, logs: Path, after: tuple[str, ...]) -> Job:
    """One process per task (models load once per process), the same size, seeds and variants."""
    scope = ["--size", args.size, "--seeds", *map(str, size.seeds), "--variants", *size.variants]
    return Job(f"evaluation {task}", [_python(), "-m", "toy.experiment", "--evaluate_task", task,
                                      "--pretrained", str(world), "--out", str(out), *scope],
               {}, logs / f"eval_{task}.log", after=after)


def schedule(world: Path, out: Path, args, size: Size, logs: Path) -> tuple[list[Job], int, int]:
    """Baselines first, then each task's runs followed by its evaluation, which comes after them:
    a task is evaluated as soon as its runs are done, while the next task trains. Returns the
    jobs and how many baselines and runs there are to do."""
    baselines = baseline_jobs(world, args.tasks, size, logs)
    jobs, runs = list(baselines), 0
    if "cpo" in size.variants:
        jobs += cpo_data_jobs(world, out, args.tasks, size, logs)
    for task in args.tasks:
        task_runs = finetune_jobs(world, out, [task], size)
        after = (f"baseline {task}", *(job.name for job in task_runs))
        jobs += [*task_runs, evaluation_job(world, out, task, args, size, logs, after)]
        runs += len(task_runs)
    return jobs, len(baselines), runs


# ---------------------------------------------------------------------------------------------
# The table, the plots
# ---------------------------------------------------------------------------------------------


def _metric(out: Path, task: str, name: str) -> tuple[float, float]:
    spec = TASKS[task]
    results = json.loads((out / "eval" / task / name / "results.json").read_text())
    return results[spec.metric[0]]["metrics"][spec.metric[1]], results["fid"]["metrics"]["fid"]


def _train_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _mean_or(values: list[float], empty):
    return statistics.fmean(values) if values else empty


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(values: list[float], reference: list[float], higher_is_better: bool) -> dict:
    """A variant's seeds against the reference variant's: difference of means, its standard error
    (Welch: sqrt(s1^2/n1 + s2^2/n2)) and whether it is larger than 2 standard errors, and which way."""
    difference = statistics.fmean(values) - statistics.fmean(reference)
    variance = sum(statistics.variance(v) / len(v) for v in (values, reference) if len(v) > 1)
    error = variance ** 0.5
    significant = len(values) > 1 and len(reference) > 1 and abs(difference) > 2 * error
    better = difference > 0 if higher_is_better else difference < 0
    return {"difference": difference, "standard_error": error, "significant": significant,
            "direction": ("better" if better else "worse") if significant else "same"}


def machine() -> dict:
    """What the reward runs' last digits depend on: the same code gave other reward runs on another
    CPU (docs/TOY_EXPERIMENT.md, Reproducibility). Runs reused from an earlier invocation may have
    been trained elsewhere; this is the machine that wrote the table."""
    import platform

    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__}


def collect(world: Path, out: Path, tasks: list[str], size: Size) -> dict:
    results = {"size": size.__dict__ | {"seeds": list(size.seeds), "variants": list(size.variants)},
               "settings": list(TOY_SETTINGS), "reference_variant": REFERENCE_VARIANT, "tasks": {}}
    for task in tasks:
        spec = TASKS[task]
        metric, fid = _metric(out, task, BASELINE_NAME)
        oracle_metric, oracle_fid = _metric(out, task, ORACLE_NAME)
        entry = {"metric": f"{spec.metric[1]}", "label": spec.metric_label, "higher_is_better": spec.higher_is_better,
                 "grad_scale": paper_grad_scale(spec.launcher) * size.grad_scale_factor,
                 "oracle": {"metric": oracle_metric, "fid": oracle_fid},
                 "start": {"metric": metric, "fid": fid}, "variants": {}}
        for variant in size.variants:
            per_seed = {seed: _metric(out, task, f"{variant}/seed{seed}") for seed in size.seeds}
            logs = {seed: _train_log(run_dir(out, task, variant, seed)) for seed in size.seeds}
            mean_metric, std_metric = _spread([m for m, _ in per_seed.values()])
            mean_fid, std_fid = _spread([f for _, f in per_seed.values()])
            tail = max(1, size.steps // 5)  # the reward loss over the last fifth of training
            entry["variants"][variant] = {
                "metric": {"mean": mean_metric, "std": std_metric, "per_seed": [per_seed[s][0] for s in size.seeds]},
                "fid": {"mean": mean_fid, "std": std_fid, "per_seed": [per_seed[s][1] for s in size.seeds]},
                "final_reward_loss": statistics.fmean(
                    _mean_or([line["reward_loss"] for line in log[-tail:] if line["rewarded_fraction"] > 0], 0.0)
                    for log in logs.values()),
                "mean_uncertainty": _mean_or([line["uncertainty"] for log in logs.values() for line in log
                                              if "uncertainty" in line], None),
                "metric_over_steps": [[0, metric]] + [
                    [step, _metric(out, task, f"{variant}/seed{size.seeds[0]}/step{step}")[0]]
                    for step in checkpoint_steps(size)] + [[size.steps, per_seed[size.seeds[0]][0]]],
            }
        if REFERENCE_VARIANT in size.variants:
            reference = entry["variants"][REFERENCE_VARIANT]["metric"]["per_seed"]
            for variant in size.variants:
                if variant != REFERENCE_VARIANT:
                    entry["variants"][variant]["vs_reference"] = compare(
                        entry["variants"][variant]["metric"]["per_seed"], reference, spec.higher_is_better)
        results["tasks"][task] = entry
    return results


MARKS = {"better": " ▲", "worse": " ▼", "same": ""}


def table_markdown(results: dict) -> str:
    """One row per task: oracle, baseline, each variant as metric mean ± std (FID beside it); ▲ / ▼:
    better / worse than diffusion-only fine-tuning by more than 2 standard errors."""
    size = results["size"]
    seeds, variants = len(size["seeds"]), size["variants"]
    header = ("| task (metric) | oracle (real images) | baseline (start) | "
              + " | ".join(VARIANT_NAMES[v] for v in variants) + " |\n" + "|---" * (3 + len(variants)) + "|\n")
    lines, following = [], []
    for task, entry in results["tasks"].items():
        arrow = "↑" if entry["higher_is_better"] else "↓"
        cells = []
        for v in variants:
            result = entry["variants"][v]
            mark = MARKS[result["vs_reference"]["direction"]] if "vs_reference" in result else ""
            cells.append(f"{result['metric']['mean']:.4g} ± {result['metric']['std']:.2g}{mark} "
                         f"(FID {result['fid']['mean']:.3g})")
        lines.append(f"| {task} ({entry['label']} {arrow}) | {entry['oracle']['metric']:.4g} (FID {entry['oracle']['fid']:.3g}) "
                     f"| {entry['start']['metric']:.4g} (FID {entry['start']['fid']:.3g}) | " + " | ".join(cells) + " |")
        pp = entry["variants"].get("controlnet_pp", {}).get("vs_reference")
        if pp is not None and pp["direction"] == "better":
            following.append(task)
    note = (f"Metric mean ± standard deviation over {seeds} seeds ({', '.join(map(str, size['seeds']))}), FID (mean) "
            f"beside it; every variant fine-tunes the task's baseline for {size['steps']} steps with the same data and "
            f"seed; reward weight {size['grad_scale_factor']:g} x the paper's grad_scale. ▲ / ▼: better / worse than "
            f"ControlNet (diffusion-only fine-tuning) by more than 2 standard errors of the difference. Oracle: the real "
            f"validation images scored the same way (the metric's ceiling). FID uses the toy world's feature extractor "
            f"(only comparable within a row).")
    if REFERENCE_VARIANT in variants and "controlnet_pp" in variants:
        note += (f" ControlNet++ is better than diffusion-only fine-tuning by more than 2 standard errors on "
                 f"{len(following)} of {len(results['tasks'])} tasks" + (f" ({', '.join(following)})." if following else "."))
    return "## Controllability (and FID)\n\n" + header + "\n".join(lines) + "\n\n" + note + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    """reward_loss.png: training reward loss (mean over seeds, moving average); metric_over_steps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    colors = {"controlnet": "tab:gray", "controlnet_pp": "tab:blue", "ctrl_u": "tab:orange", "cpo": "tab:green"}
    written = []
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant in [v for v in results["size"]["variants"] if v in REWARD_VARIANTS]:  # CPO has no reward
            logs = [_train_log(run_dir(out, task, variant, s)) for s in results["size"]["seeds"]]
            steps = [line["step"] for line in logs[0]]
            # Mean reward loss of the rewarded samples of each step; steps with none rewarded carry the last value.
            curve, last = [], 0.0
            for i in range(len(steps)):
                values = [log[i]["reward_loss"] for log in logs if i < len(log) and log[i]["rewarded_fraction"] > 0]
                last = statistics.fmean(values) if values else last
                curve.append(last)
            window = max(1, len(curve) // 10)
            smooth = [statistics.fmean(curve[max(0, i - window + 1): i + 1]) for i in range(len(curve))]
            ax.plot(steps, smooth, color=colors[variant], label=VARIANT_NAMES[variant],
                    linestyle="--" if variant == "controlnet" else "-")  # dashed: visible under the others
        ax.set_title(task)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("reward loss (rewarded samples)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    written.append(out / "reward_loss.png")
    figure.savefig(written[-1], dpi=90)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entry = results["tasks"][task]
        for variant in results["size"]["variants"]:
            points = entry["variants"][variant]["metric_over_steps"]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[variant],
                    label=VARIANT_NAMES[variant])
        ax.set_title(f"{task} ({entry['label']} {'↑' if entry['higher_is_better'] else '↓'})")
        ax.set_xlabel("step")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    written.append(out / "metric_over_steps.png")
    figure.savefig(written[-1], dpi=90)
    plt.close(figure)
    return written


def sample_grid(out: Path, tasks: list[str], seed: int, variants=VARIANTS, rows_per_task: int = 2,
                height: int = 128) -> Path:
    """For a few validation rows per task: the eval visualisation of the baseline and of each variant.

    Each visualisation is condition | 2 generations over real image | their extracted conditions.
    """
    from PIL import Image

    from utils.io import hstack_images, save_image, vstack_images

    lines = []
    for task in tasks:
        for row in range(rows_per_task):
            paths = [out / "eval" / task / name / "visualization" / f"{row}.png"
                     for name in (BASELINE_NAME, *(f"{v}/seed{seed}" for v in variants))]
            if all(p.is_file() for p in paths):
                # One height for every task (HED / line drawing are scored at 192 px, the rest at 64).
                images = [Image.open(p).convert("RGB") for p in paths]
                images = [im.resize((im.width * height // im.height, height), Image.BICUBIC) for im in images]
                lines.append(hstack_images(images))
    path = out / "samples.png"
    save_image(vstack_images(lines), path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def check_reused_settings(out: Path, size: Size, world: Path) -> None:
    """Finished runs and evaluations in ``out`` are reused: only when made with the same settings,
    from the same pretrained world (its baselines), with the same seed keeping the checkpoints."""
    record = out / "experiment.json"
    settings = {key: list(value) if isinstance(value, tuple) else value
                for key, value in size.__dict__.items() if key in REUSED_SETTINGS}
    settings.update(pretrained=str(Path(world).resolve()), first_seed=size.seeds[0])
    if record.is_file():
        previous = json.loads(record.read_text())
        changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
        if changed:
            details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise SystemExit(f"{out} holds runs made with other settings ({details}); they would be reused as if "
                             f"they were this run's. Pass another --out, or delete {out} to start over.")
    elif (out / "runs").is_dir():
        raise SystemExit(f"{out} holds runs but no {record.name} saying how they were made; pass another --out, "
                         f"or delete {out} to start over.")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="python -m toy.experiment")
    parser.add_argument("--toy", default="work_dirs/toy", help="the random toy world (made when missing)")
    parser.add_argument("--pretrained", default="work_dirs/toy-pretrained",
                        help="the pretrained toy world (made from --toy when missing); baselines go in its controlnets/")
    parser.add_argument("--out", default="work_dirs/toy-experiment", help="runs, evaluations, table and plots")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                        help="tasks, in the order they are trained (the table keeps the paper's order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the size's (full: 0 1 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: ControlNet, ControlNet++, Ctrl-U (add cpo for CPO's row)")
    parser.add_argument("--pretrain", action="store_true",
                        help="pretrain the toy world here (about an hour) instead of restoring the shipped one")
    parser.add_argument("--grad_scale_factor", type=float, default=None,
                        help=f"reward weight = this x the launcher's grad_scale (default {TOY_GRAD_SCALE_FACTOR:g})")
    parser.add_argument("--train_flags", nargs=argparse.REMAINDER, default=None,
                        help="last: flags appended to every fine-tuning run, e.g. --train_flags "
                             "--uncertainty_timestep_offset 50")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (one thread each)")
    parser.add_argument("--evaluate_task", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.seeds is not None and len(args.seeds) < 1:
        parser.error("--seeds needs at least one seed")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    size = SIZES[args.size]
    overrides = {"seeds": tuple(args.seeds) if args.seeds else None, "grad_scale_factor": args.grad_scale_factor,
                 "train_flags": tuple(args.train_flags) if args.train_flags else None,
                 "variants": tuple(v for v in VARIANTS if v in args.variants) if args.variants else None}
    size = Size(**{**size.__dict__, **{key: value for key, value in overrides.items() if value is not None}})
    out, start = Path(args.out), time.perf_counter()
    if args.evaluate_task is not None:
        evaluate_task(Path(args.pretrained), out, args.evaluate_task, size)
        return None

    def stage(text: str) -> None:
        print(f"\n== [{time.perf_counter() - start:5.0f} s] {text}", flush=True)

    stage("pretrained toy world")
    world = ensure_worlds(args, size)
    check_reused_settings(out, size, world)
    logs = out / "logs"
    jobs, baselines, runs = schedule(world, out, args, size, logs)
    stage(f"{baselines} baselines to train (train/train_controlnet.py, {size.baseline_steps} steps) -> "
          f"{world / 'controlnets'}; {runs} fine-tuning runs to do ({len(args.tasks)} tasks x "
          f"{len(size.variants)} variants x seeds {list(size.seeds)}, {size.steps} steps each, through "
          f"train/reward_<task>.sh or train/cpo_<task>.sh), each task evaluated with eval/ once its runs are done; {args.jobs} at a time")
    run_jobs(jobs, args.jobs)
    stage("table and plots")
    in_table_order = [task for task in TASKS if task in args.tasks]  # the paper's order, whatever ran first
    results = collect(world, out, in_table_order, size)
    results["seconds"] = round(time.perf_counter() - start)
    results["written_on"] = machine()
    table = table_markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table)
    written = [*plot(results, out), sample_grid(out, in_table_order, size.seeds[0], size.variants)]
    print(table)
    print(f"written: {out / 'table.md'}, {out / 'results.json'}, " + ", ".join(map(str, written)))
    stage("done")
    return results


if __name__ == "__main__":
    main()
