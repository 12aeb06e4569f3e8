"""End-to-end training runs on the toy world: the real entry points, checkpoints, resume, launchers.

- two CPU processes (gloo, through ``accelerate launch``) train, checkpoint, and a run stopped
  after its checkpoint and resumed ends with exactly the weights of an uninterrupted run;
- every task (and the plain fine-tuning stage) trains a few steps and writes checkpoints,
  validation grids and a final ControlNet that loads into StableDiffusionControlNetPipeline
  (in-process ``main`` in the default tier; all eight launchers through bash in the slow tier).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import OFFLINE_ENV
from test_train_step import SEGMENTATION, TOY_TASKS, load_entry, needs_mmseg, toy_flags

SHORT_RUN = ["--num_validation_images", "1", "--num_validation_inference_steps", "2"]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:3]}"


def assert_loads_into_pipeline(world: Path, controlnet_dir: Path) -> None:
    """The saved ControlNet loads into StableDiffusionControlNetPipeline and generates an image."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(world / "toy-sd15", controlnet=controlnet,
                                                                 safety_checker=None, feature_extractor=None)
    pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return scalars


def test_two_processes_train_checkpoint_and_resume_like_an_uninterrupted_run(toy_world, tmp_path):
    """train/reward_canny.sh with NUM_PROCESSES=2 on CPU (a gloo group). 10 rows, batch 2 per
    process, accumulation 2: an epoch is 3 batches per process = 2 optimizer steps, so
    checkpoint-3 is in the middle of the second epoch and the resumed run must skip that epoch's
    first 2 batches, not replay them."""
    flags = ["--max_train_samples", "10", "--ema_decay", "0.9", "--learning_rate", "1e-3",
             "--max_timestep_rewarding", "500", "--lr_warmup_steps", "2"]
    env = {"NUM_PROCESSES": "2", "GRAD_ACCUM": "2", "CHECKPOINTING_STEPS": "3", "VALIDATION_STEPS": "4",
           "OMP_NUM_THREADS": "1"}
    whole, part = tmp_path / "uninterrupted", tmp_path / "stopped_and_resumed"
    first = run_launcher("reward_canny", toy_world, whole, *flags, "--max_train_steps", "4",
                         "--report_to", "tensorboard", env=env)
    assert "--multi_gpu --num_processes 2" in first.stdout and "ACCELERATE_USE_CPU=1" in first.stdout
    assert "(2 per process x 2 processes x 2 accumulation)" in first.stderr
    run_launcher("reward_canny", toy_world, part, *flags, "--max_train_steps", "3", env=env)
    # The launcher passes --resume_from_checkpoint latest: running it again continues.
    resumed = run_launcher("reward_canny", toy_world, part, *flags, "--max_train_steps", "4", env=env)
    assert f"Resuming from {part / 'checkpoint-3'}" in resumed.stderr

    checkpoint = whole / "checkpoint-3"
    for name in ("controlnet/config.json", "controlnet_ema/ema_state.json", "optimizer.bin", "scheduler.bin",
                 "random_states_0.pkl", "random_states_1.pkl", "training_config.json"):
        assert (checkpoint / name).is_file(), name
    config = json.loads((checkpoint / "training_config.json").read_text())
    assert config["task_name"] == "canny" and config["gradient_accumulation_steps"] == 2
    assert config["grad_scale"] == 1.0 and config["learning_rate"] == 1e-3  # launcher value, then the override
    assert json.loads((whole / "controlnet_ema" / "ema_state.json").read_text())["num_updates"] == 4

    # Training moved the weights, and the resumed run ends exactly where the uninterrupted one does.
    initial, final = load_weights(toy_world / "toy-controlnet"), load_weights(whole)
    assert any(not torch.equal(initial[k], final[k]) for k in initial)
    assert_same_weights(whole, part)
    assert_same_weights(whole / "controlnet_ema", part / "controlnet_ema")
    assert_same_weights(whole / "checkpoint-3" / "controlnet", part / "checkpoint-3" / "controlnet")

    grid = whole / "validation" / "step-4" / "sample-0.png"
    assert grid.is_file()
    scalars = tensorboard_scalars(whole / "logs")
    for tag in ("loss", "diffusion_loss", "reward_loss", "rewarded_fraction", "lr", "step_time"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    # constant_with_warmup over 2 optimizer steps: accelerate steps the scheduler once per process,
    # so the code asks for 2 x 2 warmup steps; after optimizer step k the lr is 1e-3 * min(1, k / 2).
    assert [value for _, value in scalars["lr"]] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert_loads_into_pipeline(toy_world, whole)
    assert_loads_into_pipeline(toy_world, whole / "controlnet_ema")


@pytest.fixture
def fresh_accelerate_state():
    """In-process runs share accelerate's singletons; reset them around each run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# canny also runs through its launcher on 2 processes above, so its in-process run is in the slow tier.
@pytest.mark.parametrize("key", [pytest.param("canny", marks=pytest.mark.slow),
                                 *[k for k in TOY_TASKS if k != "canny"], "finetune"])
def test_each_task_trains_checkpoints_validates_and_saves(toy_world, tmp_path, fresh_accelerate_state, key):
    """Three steps of every task through the scripts' ``main`` (in-process to keep the default tier short)."""
    needs_mmseg(key)
    out = tmp_path / "out"
    steps = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "3", "--use_ema",
             "--num_validation_rows", "1", *SHORT_RUN]
    if key == "finetune":
        script = load_entry("train_controlnet")
        flags = [f for f in toy_flags(toy_world, "ade20k", out, *steps)]
        # Plain fine-tuning: no reward flags (they do not exist in train_controlnet.py).
        for flag in ("--task_name", "--label_column", "--reward_model_name_or_path"):
            index = flags.index(flag)
            del flags[index : index + 2]
    else:
        script = load_entry("reward_control")
        flags = toy_flags(toy_world, key, out, *steps)
    script.main(script.parse_args(flags))

    assert (out / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "controlnet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "training_config.json").read_text())["max_train_steps"] == 3
    grid = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "validation" / "step-3" / "sample-0.png"))
    columns = 2 if key == "finetune" else 3  # condition | generated (| condition of the generated image)
    assert grid.shape == (64, columns * 64, 3)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3]
    config = json.loads((out / "training_config.json").read_text())
    for line in log:  # the logged loss is the paper's combination of the logged parts
        expected = config["diffusion_loss_weight"] * line["diffusion_loss"] + config.get("grad_scale", 0) * line["reward_loss"]
        assert line["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert line["diffusion_loss"] > 0 and line["rewarded_fraction"] in (0.0, 0.5, 1.0)
        assert (line["reward_loss"] > 0) == (key != "finetune" and line["rewarded_fraction"] > 0)
    if key != "finetune":
        # The third column is the reward model's condition of the generated image, recomputed here.
        from reward_models import build_reward_model

        task, _, task_flags = TOY_TASKS[key]
        path = dict(zip(task_flags[::2], task_flags[1::2]))["--reward_model_name_or_path"].format(world=toy_world)
        reward_model = build_reward_model(task, path)
        generated = torch.from_numpy(grid[:, 64:128].copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            condition = reward_model.extract_condition(generated)[0].float().clamp(0, 1)
        expected_column = (condition * 255).round().byte().permute(1, 2, 0).numpy().astype(int)
        assert (np.abs(expected_column - grid[:, 128:].astype(int)) <= 1).mean() > 0.99
    final, at_two = load_weights(out), load_weights(out / "checkpoint-2" / "controlnet")
    assert any(not torch.equal(final[k], at_two[k]) for k in final), "step 3 did not change the weights"
    assert_loads_into_pipeline(toy_world, out)


# ----------------------------------------------------------------------------------------------
# Launchers (bash, accelerate launch), the way users run them
# ----------------------------------------------------------------------------------------------

LAUNCHERS = {  # launcher -> (toy task key, paper values the launcher must pass; warmups: the original's effective
    # optimizer steps, its flag x 4 accumulation / 8 processes, see test_fidelity.py)
    "reward_canny": ("canny", {"grad_scale": 1.0, "lr_warmup_steps": 0}),
    "reward_hed": ("hed", {"grad_scale": 1.0, "lr_warmup_steps": 5}),
    "reward_linedrawing": ("lineart", {"grad_scale": 0.5, "lr_warmup_steps": 5}),
    "reward_depth": ("depth", {"grad_scale": 1.0, "lr_warmup_steps": 5}),
    "reward_ade20k": ("ade20k", {"grad_scale": 0.5, "lr_warmup_steps": 100}),
    "reward_cocostuff": ("cocostuff", {"grad_scale": 0.2, "lr_warmup_steps": 5}),
    "finetune_ade20k": ("ade20k", {"lr_warmup_steps": 100}),
    "finetune_cocostuff": ("cocostuff", {"lr_warmup_steps": 100}),
}
PAPER_VALUES = {"learning_rate": 1e-5, "lr_scheduler": "constant_with_warmup", "gradient_checkpointing": True,
                "use_ema": True, "min_timestep_rewarding": 0, "max_timestep_rewarding": 200, "seed": 0}


def _run_accelerate(tmp_path: Path, num_processes: str, path_prefix: str = ""):
    """``run_accelerate`` of train/_launch.sh on a script that prints what it was given."""
    import subprocess

    script = tmp_path / "show.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'argv': sys.argv[1:], 'use_cpu': os.environ.get('ACCELERATE_USE_CPU'),\n"
                      "                  'threads': os.environ.get('OMP_NUM_THREADS')}))\n")
    env = {**os.environ, "NUM_PROCESSES": num_processes, "CUDA_VISIBLE_DEVICES": "",
           "PATH": path_prefix + os.environ["PATH"]}
    for name in ("ACCELERATE_CONFIG", "MIXED_PRECISION", "OMP_NUM_THREADS"):
        env.pop(name, None)
    result = subprocess.run(["bash", "-c", 'source train/_launch.sh && run_accelerate "$0" --flag 1', str(script)],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_one_process_runs_the_script_directly_and_more_go_through_accelerate_launch(tmp_path):
    printed, shown = _run_accelerate(tmp_path, "1")
    assert printed.startswith("+ ACCELERATE_USE_CPU=1 ") and " launch " not in printed
    # One OpenMP thread unless set, as `accelerate launch` would have exported.
    assert json.loads(shown) == {"argv": ["--mixed_precision", "no", "--flag", "1"], "use_cpu": "1", "threads": "1"}
    # Two processes: the real launcher with --multi_gpu (a stand-in `accelerate` records the call).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/usr/bin/env bash\necho "accelerate $*"\n')
    (fake / "accelerate").chmod(0o755)
    printed, called = _run_accelerate(tmp_path, "2", f"{fake}:")
    assert called.startswith("accelerate launch --multi_gpu --num_processes 2 --num_machines 1")
    assert called.endswith("show.py --mixed_precision no --flag 1")


def run_launcher(name: str, world: Path, output_dir: Path, *extra: str, env: dict | None = None):
    key, _ = LAUNCHERS[name]
    _, dataset, flags = TOY_TASKS[key]
    reward_path = dict(zip(flags[::2], flags[1::2])).get("--reward_model_name_or_path", "").format(world=world)
    env = {
        "SD_PATH": str(world / "toy-sd15"), "CONTROLNET_PATH": str(world / "toy-controlnet"),
        "DATASET": str(world / "datasets" / dataset), "OUTPUT_DIR": str(output_dir), "NUM_PROCESSES": "1",
        "RESOLUTION": "64", "TRAIN_BATCH_SIZE": "2", "GRAD_ACCUM": "1", "MAX_TRAIN_STEPS": "2",
        "CHECKPOINTING_STEPS": "2", "VALIDATION_STEPS": "2", "NUM_WORKERS": "0", "CUDA_VISIBLE_DEVICES": "",
        **({"REWARD_MODEL_PATH": reward_path} if name.startswith("reward") else {}), **(env or {}),
    }
    import subprocess

    result = subprocess.run(["bash", f"train/{name}.sh", *SHORT_RUN, "--report_to", "none", *extra],
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, **OFFLINE_ENV, **env},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-5000:]}\n{result.stderr[-8000:]}"
    return result


def check_launcher_run(name: str, world: Path, output_dir: Path, result) -> None:
    _, expected = LAUNCHERS[name]
    assert "+ ACCELERATE_USE_CPU=1 " in result.stdout  # the resolved command is printed first
    config = json.loads((output_dir / "training_config.json").read_text())
    for key, value in {**PAPER_VALUES, **expected}.items():
        if key in config or name.startswith("reward"):
            assert config[key] == value, (name, key, config.get(key))
    assert config["resolution"] == 64 and config["gradient_accumulation_steps"] == 1
    assert (output_dir / "checkpoint-2" / "controlnet_ema" / "config.json").is_file()
    assert (output_dir / "validation" / "step-2" / "sample-0.png").is_file()
    assert_loads_into_pipeline(world, output_dir)


@pytest.mark.slow
def test_hed_launcher_on_the_toy_world(toy_world, tmp_path):
    """The HED launcher as users run it (the task whose reward had no gradient in the original)."""
    out = tmp_path / "hed"
    check_launcher_run("reward_hed", toy_world, out, run_launcher("reward_hed", toy_world, out))
    config = json.loads((out / "training_config.json").read_text())
    assert config["task_name"] == "hed" and config["resume_from_checkpoint"] == "latest"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAUNCHERS if n != "reward_hed"])
def test_every_launcher_on_the_toy_world(toy_world, tmp_path, name):
    key, _ = LAUNCHERS[name]
    needs_mmseg(key)
    out = tmp_path / name
    check_launcher_run(name, toy_world, out, run_launcher(name, toy_world, out))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", SEGMENTATION)
def test_segmentation_reward_starts_from_the_finetune_output(toy_world, tmp_path, dataset):
    """finetune_<dataset>.sh then reward_<dataset>.sh on its output, as in the paper's two stages."""
    needs_mmseg(dataset)
    finetuned = tmp_path / "finetune"
    # A large lr without warm-up, so that the fine-tune moves the weights far from the toy ControlNet.
    run_launcher(f"finetune_{dataset}", toy_world, finetuned, "--learning_rate", "1e-3", "--lr_warmup_steps", "0")
    out = tmp_path / "reward"
    result = run_launcher(f"reward_{dataset}", toy_world, out, "--controlnet_model_name_or_path", str(finetuned))
    check_launcher_run(f"reward_{dataset}", toy_world, out, result)
    # The paper's lr (1e-5, in warm-up) moves the weights by far less than the fine-tune did: the
    # reward stage ends next to the fine-tune's output, not next to the toy ControlNet.
    toy, start, end = load_weights(toy_world / "toy-controlnet"), load_weights(finetuned), load_weights(out)
    moved_by_finetune = max((start[k] - toy[k]).abs().max().item() for k in toy)
    moved_by_reward = max((end[k] - start[k]).abs().max().item() for k in start)
    assert moved_by_finetune > 1e-4 and moved_by_reward < 0.1 * moved_by_finetune, (moved_by_finetune, moved_by_reward)


def test_nonfinite_losses_skip_the_step_then_stop_with_a_message(toy_world, tmp_path, fresh_accelerate_state,
                                                                  monkeypatch):
    from train import reward_control

    seen = {}
    real_step = reward_control.training_step

    def nan_step(batch, parts, controlnet, *args, **kwargs):
        seen["controlnet"] = controlnet
        out = real_step(batch, parts, controlnet, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(reward_control, "training_step", nan_step)
    script = load_entry("reward_control")
    args = script.parse_args(toy_flags(toy_world, "canny", tmp_path / "out", "--max_train_steps", "5",
                                       "--max_nonfinite_steps", "2", "--validation_steps", "100"))
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row had a non-finite loss \(last at step 2\); "
                                           r"stopping\. Lower --learning_rate"):
        script.main(args)
    initial = load_weights(toy_world / "toy-controlnet")
    trained = {k: v.detach().cpu() for k, v in seen["controlnet"].state_dict().items()}
    assert all(torch.equal(initial[k], trained[k]) for k in initial), "a non-finite step changed the weights"


def test_without_ema_and_with_a_checkpoint_limit(toy_world, tmp_path, fresh_accelerate_state):
    """--use_ema off saves fine (defect 5 crashed at the final save); only the newest checkpoints stay."""
    script = load_entry("reward_control")
    out = tmp_path / "out"
    script.main(script.parse_args(toy_flags(toy_world, "canny", out, "--max_train_steps", "3",
                                            "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                                            "--validation_steps", "100")))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "controlnet_ema").exists() and not (out / "checkpoint-3" / "controlnet_ema").exists()
    assert_same_weights(out, out / "checkpoint-3" / "controlnet")
