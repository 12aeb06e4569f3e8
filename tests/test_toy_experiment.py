"""The toy-scale experiment (toy/experiment.py): ControlNet vs ControlNet++ vs Ctrl-U vs CPO.

Default tier: the whole command at its small size on a copy of the test toy world (two tasks,
two seeds, a few steps): baselines via train/train_controlnet.py, every variant through its
launcher, evaluation through eval/, then the table, results.json and the plots, checked against
the per-run files they are made from. Slow tier: the real experiment (README "Does it work?").
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from test_train_step import needs_mmseg

TASKS = ("hed", "ade20k")  # MS-SSIM on upsampled 64 px generations, and mmseg segmentation
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def small_experiment(toy_world, tmp_path_factory):
    needs_mmseg("ade20k")
    from toy import experiment

    root = tmp_path_factory.mktemp("experiment")
    world = root / "world"  # baselines are written into the world: a copy, not the shared fixture
    shutil.copytree(toy_world, world, ignore=shutil.ignore_patterns("cache-*.arrow"))
    out = root / "out"
    argv = ["--size", "small", "--pretrained", str(world), "--out", str(out), "--tasks", *TASKS,
            "--seeds", *map(str, SEEDS), "--train_flags", "--ema_decay", "0.99"]
    results = experiment.main(argv)
    return experiment, world, out, argv, results


def test_the_table_and_results_come_from_the_runs_evaluations(small_experiment):
    experiment, world, out, _, results = small_experiment
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"].keys() == set(TASKS) and on_disk["size"]["seeds"] == list(SEEDS)
    import torch

    assert on_disk["written_on"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for task in TASKS:
        spec = experiment.TASKS[task]
        entry = on_disk["tasks"][task]
        for variant in experiment.VARIANTS:
            per_seed = []
            for seed in SEEDS:  # read independently from each evaluation folder
                evaluation = json.loads((out / "eval" / task / variant / f"seed{seed}" / "results.json").read_text())
                per_seed.append(evaluation[spec.metric[0]]["metrics"][spec.metric[1]])
                config = json.loads((out / "eval" / task / variant / f"seed{seed}" / "eval_config.json").read_text())
                assert Path(config["model_path"]) == out / "runs" / task / variant / f"seed{seed}"
            value = entry["variants"][variant]["metric"]
            assert value["per_seed"] == pytest.approx(per_seed)
            assert value["mean"] == pytest.approx(statistics.fmean(per_seed))
            assert value["std"] == pytest.approx(statistics.stdev(per_seed))
    table = (out / "table.md").read_text()
    for task in TASKS:
        entry = on_disk["tasks"][task]
        oracle = json.loads((out / "eval" / task / "oracle" / "results.json").read_text())
        oracle_config = json.loads((out / "eval" / task / "oracle" / "eval_config.json").read_text())
        assert oracle_config["model"] == "oracle"
        assert entry["oracle"]["metric"] == pytest.approx(oracle[spec_metric(experiment, task)[0]]["metrics"]
                                                          [spec_metric(experiment, task)[1]])
        rows = [line for line in table.splitlines() if line.startswith(f"| {task} (")]
        assert len(rows) == 1, rows
        # Every cell is the value of results.json, formatted as the table formats it.
        oracle_cell, start_cell, *cells = rows[0].strip("|").split("|")[1:]
        assert oracle_cell.strip() == f"{entry['oracle']['metric']:.4g} (FID {entry['oracle']['fid']:.3g})"
        assert start_cell.strip() == f"{entry['start']['metric']:.4g} (FID {entry['start']['fid']:.3g})"
        for variant, cell in zip(experiment.VARIANTS, cells):
            metric, fid = entry["variants"][variant]["metric"], entry["variants"][variant]["fid"]
            text = cell.strip().replace(" ▲", "").replace(" ▼", "")
            assert text == f"{metric['mean']:.4g} ± {metric['std']:.2g} (FID {fid['mean']:.3g})"
    for name in ("reward_loss.png", "metric_over_steps.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.width > 200 and image.height > 100


def spec_metric(experiment, task):
    return experiment.TASKS[task].metric


def _results(rows: dict) -> dict:
    """A results.json for table_markdown: {task: (higher_is_better, {variant: per-seed values})}."""
    from toy import experiment

    tasks = {}
    for task, (higher, values) in rows.items():
        variants = {v: {"metric": {"mean": statistics.fmean(x), "std": statistics.stdev(x), "per_seed": x},
                        "fid": {"mean": 2.0, "std": 0.2}} for v, x in values.items()}
        for v in variants:
            if v != "controlnet":
                variants[v]["vs_reference"] = experiment.compare(values[v], values["controlnet"], higher)
        tasks[task] = {"label": "M", "higher_is_better": higher, "start": {"metric": 1.0, "fid": 1.0},
                       "oracle": {"metric": 9.0, "fid": 0.5}, "variants": variants}
    return {"size": {"seeds": [0, 1, 2], "variants": ["controlnet", "controlnet_pp", "ctrl_u"], "steps": 3,
                     "grad_scale_factor": 10.0}, "tasks": tasks}


def test_differences_over_two_standard_errors_are_marked_in_each_direction():
    import numpy as np

    from toy import experiment

    reference = [3.0, 3.2, 2.8]
    far, near = [4.0, 4.1, 3.9], [3.3, 3.1, 3.5]
    # Welch's standard error of the difference, worked out with numpy: far is > 2 SE away, near is not.
    se = lambda a, b: np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)  # noqa: E731
    assert abs(np.mean(far) - np.mean(reference)) > 2 * se(far, reference)
    assert abs(np.mean(near) - np.mean(reference)) < 2 * se(near, reference)
    result = experiment.compare(far, reference, True)
    assert result["standard_error"] == pytest.approx(se(far, reference))
    assert result["difference"] == pytest.approx(np.mean(far) - np.mean(reference))
    table = experiment.table_markdown(_results({
        "up": (True, {"controlnet": reference, "controlnet_pp": far, "ctrl_u": near}),  # higher is better: better
        "down": (False, {"controlnet": reference, "controlnet_pp": far, "ctrl_u": near}),  # lower is better: worse
    }))
    rows = {line.split("(")[0].strip("| "): line.strip("|").split("|") for line in table.splitlines()
            if line.startswith(("| up (", "| down ("))}
    assert rows["up"][1].strip() == "9 (FID 0.5)" and rows["up"][2].strip() == "1 (FID 1)"
    assert "▲" in rows["up"][4] and "▼" in rows["down"][4]  # ControlNet++: far from the reference
    assert not any(mark in cell for row in rows.values() for cell in (row[3], row[5]) for mark in "▲▼")
    assert "better than diffusion-only fine-tuning by more than 2 standard errors on 1 of 2 tasks (up)" in table


def test_each_variant_trained_as_specified(small_experiment):
    experiment, world, out, _, _ = small_experiment
    baseline = json.loads((world / "controlnets" / "hed" / "training_config.json").read_text())
    assert baseline["condition_detector"] == "hed" and baseline["max_train_steps"] == experiment.SIZES["small"].baseline_steps
    for task in TASKS:
        paper = experiment.paper_grad_scale(experiment.TASKS[task].launcher)
        configs = {variant: json.loads((out / "runs" / task / variant / "seed1" / "training_config.json").read_text())
                   for variant in experiment.VARIANTS}
        for config in configs.values():  # same data, seed, steps and start for all three
            assert config["seed"] == 1 and config["max_train_steps"] == experiment.SIZES["small"].steps
            assert config["ema_decay"] == 0.99  # --train_flags reach every run
            assert Path(config["controlnet_model_name_or_path"]) == world / "controlnets" / task
            assert config["gradient_checkpointing"] is False and config["learning_rate"] == 1e-3
        assert configs["controlnet"]["grad_scale"] == 0
        assert configs["controlnet_pp"]["grad_scale"] == pytest.approx(paper * experiment.TOY_GRAD_SCALE_FACTOR)
        assert not configs["controlnet_pp"]["uncertainty_weighting"]
        assert configs["ctrl_u"]["uncertainty_weighting"] and configs["ctrl_u"]["max_timestep_rewarding"] == 400
        # The reward is logged for the diffusion-only run too (computed without gradient).
        log = [json.loads(line) for line in (out / "runs" / task / "controlnet" / "seed0" / "train_log.jsonl")
               .read_text().splitlines()]
        assert any(line["reward_loss"] > 0 for line in log)


def test_segmentation_is_scored_by_another_network_than_the_one_that_rewards(small_experiment):
    # The paper rewards ADE20K with UperNet-R50 and scores it with Mask2Former: the toy world's
    # evaluation segmenter is another architecture, trained separately.
    from mmengine.config import Config

    experiment, world, out, _, _ = small_experiment
    config = json.loads((out / "runs" / "ade20k" / "controlnet_pp" / "seed0" / "training_config.json").read_text())
    rewarding = Path(config["reward_model_name_or_path"])
    assert rewarding == world / "reward_models" / "ade20k_seg"
    for folder in ("ade20k/controlnet_pp/seed0", "ade20k/oracle", "ade20k/start"):
        evaluation = json.loads((out / "eval" / folder / "results.json").read_text())
        for scoring in ("segmentation_paper", "segmentation"):
            assert Path(evaluation[scoring]["settings"]["eval_model"]) == world / "reward_models" / "ade20k_seg_eval"
    heads = {path.name: Config.fromfile(str(path / "config.py")).model.decode_head.type
             for path in (rewarding, world / "reward_models" / "ade20k_seg_eval")}
    assert heads == {"ade20k_seg": "UPerHead", "ade20k_seg_eval": "DepthwiseSeparableASPPHead"}
    # Depth likewise: the paper rewards with DPT-Hybrid and scores with DPT-Large.
    depth = experiment.TASKS["depth"]
    sizes = {path: json.loads((world / path / "config.json").read_text())["hidden_size"]
             for path in (depth.reward_model, depth.eval_model)}
    assert sizes == {"reward_models/dpt-hybrid-midas": 32, "reward_models/dpt-large": 64}


def test_a_second_run_reuses_everything(small_experiment):
    experiment, world, out, argv, results = small_experiment
    weights = out / "runs" / "hed" / "controlnet_pp" / "seed0" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    again = experiment.main(argv)
    assert weights.stat().st_mtime_ns == before  # nothing retrained
    assert again["tasks"] == results["tasks"]


def test_a_scorer_replaced_in_place_has_its_evaluations_redone_and_the_runs_kept(small_experiment):
    """A newer toy/weights restored into the same world folder changes a scorer but not its path:
    the evaluations it scored are redone, the runs and the other tasks' evaluations are reused."""
    import hashlib

    import torch

    experiment, world, out, argv, _ = small_experiment
    folder = world / "reward_models" / "ade20k_seg_eval"
    evaluation = out / "eval" / "ade20k" / "controlnet_pp" / "seed0"
    # The stamp is the digest of the folder's files in name order (config.py, model.pth).
    expected = hashlib.sha256(b"config.py\0" + (folder / "config.py").read_bytes()
                              + b"model.pth\0" + (folder / "model.pth").read_bytes()).hexdigest()
    stamp = json.loads((evaluation / experiment.SCORER_STAMP).read_text())
    assert stamp == {"model": "reward_models/ade20k_seg_eval", "sha256": expected}
    assert not (out / "eval" / "hed" / "controlnet_pp" / "seed0" / experiment.SCORER_STAMP).exists()

    checkpoint = torch.load(folder / "model.pth", weights_only=False)
    head = next(key for key in checkpoint["state_dict"] if key.endswith("conv_seg.weight"))
    checkpoint["state_dict"][head] = -checkpoint["state_dict"][head]  # another segmenter, same file name
    torch.save(checkpoint, folder / "model.pth")
    run = out / "runs" / "ade20k" / "controlnet_pp" / "seed0" / "diffusion_pytorch_model.safetensors"
    watched = {path: path.stat().st_mtime_ns for path in
               (run, evaluation / "results.json", out / "eval" / "hed" / "controlnet_pp" / "seed0" / "results.json")}
    experiment.main(argv)
    changed = {path.relative_to(out).as_posix() for path, before in watched.items() if path.stat().st_mtime_ns != before}
    assert changed == {"eval/ade20k/controlnet_pp/seed0/results.json"}
    assert json.loads((evaluation / experiment.SCORER_STAMP).read_text())["sha256"] != expected


def test_jobs_start_after_the_jobs_they_depend_on(tmp_path):
    """A task's evaluation waits for its runs; a dependency that is not scheduled counts as done."""
    import sys

    from toy.experiment import Job, run_jobs

    order = tmp_path / "order.txt"

    def job(name, seconds, after=()):
        code = f"import time; time.sleep({seconds}); open({str(order)!r}, 'a').write({name!r} + '\\n')"
        return Job(name, [sys.executable, "-c", code], log=tmp_path / f"{name}.log", after=after)

    # With 2 at a time, "eval a" is first in line for the second slot but must wait for "run a".
    run_jobs([job("run a", 1.0), job("eval a", 0, after=("run a", "baseline a")), job("run b", 0)], parallel=2)
    assert order.read_text().split("\n")[:3] == ["run b", "run a", "eval a"]
    with pytest.raises(RuntimeError, match="wait for each other"):
        run_jobs([job("x", 0, after=("y",)), job("y", 0, after=("x",))], parallel=2)
    failing = Job("broken", [sys.executable, "-c", "raise SystemExit(3)"], log=tmp_path / "broken.log")
    with pytest.raises(RuntimeError, match="broken failed \\(exit 3\\)"):
        run_jobs([failing, job("after broken", 0, after=("broken",))], parallel=1)
    assert "after broken" not in order.read_text()


def test_a_pretrained_world_older_than_its_evaluation_segmenters_is_refused(tmp_path):
    from toy import experiment

    world = tmp_path / "world"
    world.mkdir()
    manifest = {"paths": {"reward_models": {"hed": "reward_models/ControlNetHED.pth",
                                            "segmentation_ade20k": "reward_models/ade20k_seg"}}}
    (world / "toy_world.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"made before it had .*segmentation_ade20k_eval.*toy\.committed --out"):
        experiment.main(["--size", "small", "--pretrained", str(world), "--out", str(tmp_path / "out"), "--tasks", "hed"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # nothing written


def test_an_output_folder_made_with_other_settings_is_refused(tmp_path):
    from toy.experiment import SIZES, check_reused_settings

    out, world = tmp_path / "out", tmp_path / "world"
    check_reused_settings(out, SIZES["full"], world)
    check_reused_settings(out, SIZES["full"], world)  # same settings: reused
    with pytest.raises(SystemExit, match=r"other settings \(steps 150 -> 450, eval_groups 1 -> 2, metric_points 2 -> 3\)"):
        check_reused_settings(out, SIZES["long"], world)
    with pytest.raises(SystemExit, match=r"pretrained .*world -> .*other-world"):  # other baselines
        check_reused_settings(out, SIZES["full"], tmp_path / "other-world")
    later_seeds = dataclasses.replace(SIZES["full"], seeds=(1, 2))  # seed 1 kept no checkpoints
    with pytest.raises(SystemExit, match="first_seed 0 -> 1"):
        check_reused_settings(out, later_seeds, world)
    legacy = tmp_path / "legacy"
    (legacy / "runs").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no experiment.json"):
        check_reused_settings(legacy, SIZES["full"], world)


@pytest.mark.slow
def test_the_full_toy_experiment(tmp_path):
    """The README's experiment: six tasks, three seeds (about 15 minutes with the pretrained world present)."""
    from toy import experiment

    results = experiment.main(["--out", str(tmp_path / "out")])
    assert set(results["tasks"]) == set(experiment.TASKS) and results["size"]["seeds"] == [0, 1, 2]
    assert (tmp_path / "out" / "table.md").read_text().count("±") == 6 * len(experiment.DEFAULT_VARIANTS)
