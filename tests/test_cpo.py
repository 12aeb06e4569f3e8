"""CPO (condition preference optimisation) on the toy world: its loss, its step, its data, its runs.

The loss is checked against CPO's formula written out in numpy (float64, the expression order of
its training script: 1 / (exp(-beta / 2 * x) + 1) for both weights, clamps for the hinges); the
step against the properties the method needs (gradients only in the ControlNet, a reference that
never moves, identical conditions give the formula's constant and no gradient); the preference
data builder against eval/eval.py's own files; resume against an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_entry
from test_train_e2e import assert_same_weights, fresh_accelerate_state  # noqa: F401 (fixture)
from test_train_step import load_entry, toy_flags


def cpo_reference_numpy(lw, ll, rw, rl, beta, margin, t):
    """CPO's loss as its training script computes it, in float64 numpy."""
    lw, ll, rw, rl = (np.asarray(x, dtype=np.float64) for x in (lw, ll, rw, rl))
    model_diff, ref_diff = lw - ll, rw - rl
    scale = 1 / (np.exp(-0.5 * beta * (model_diff - ref_diff)) + 1)
    reverse_scale = 1 / (np.exp(-0.5 * beta * (-model_diff + ref_diff)) + 1)
    forward = np.maximum(lw - ll + margin, 0.0)
    reverse = np.maximum(ll - lw + margin, 0.0)
    per_sample = 0.9 * scale * forward + 0.1 * reverse_scale * reverse
    mask = (np.asarray(t) > 0).astype(np.float64)
    return 0.0 if mask.sum() == 0 else float((per_sample * mask).sum() / mask.sum()), scale, mask


def test_cpo_loss_equals_the_formula_and_its_gradient():
    reward_control = load_entry("reward_control")
    rng = np.random.default_rng(0)
    # Per-sample MSEs near each other, as they are in training (differences of ~1e-3).
    lw, ll = 0.1 + 1e-3 * rng.standard_normal(8), 0.1 + 1e-3 * rng.standard_normal(8)
    rw, rl = 0.1 + 1e-3 * rng.standard_normal(8), 0.1 + 1e-3 * rng.standard_normal(8)
    t = np.array([0, 5, 999, 120, 0, 300, 1, 42])
    beta, margin = 5000.0, 5e-3
    expected, scale, mask = cpo_reference_numpy(lw, ll, rw, rl, beta, margin, t)
    winner = torch.tensor(lw, requires_grad=True)
    loser = torch.tensor(ll, requires_grad=True)
    loss = reward_control.cpo_loss(winner, loser, torch.tensor(rw), torch.tensor(rl), beta, margin,
                                   torch.from_numpy(t) > 0)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    loss.backward()
    # d/dL_w with the weights held constant (CPO detaches them): the hinges' slopes.
    d = lw - ll
    slope = 0.9 * scale * (d + margin > 0) - 0.1 * (1 - scale) * (margin - d > 0)
    np.testing.assert_allclose(winner.grad.numpy(), slope * mask / mask.sum(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(loser.grad.numpy(), -slope * mask / mask.sum(), rtol=1e-9, atol=1e-15)


def test_cpo_loss_is_zero_without_a_sample_at_t_above_zero():
    reward_control = load_entry("reward_control")
    winner = torch.tensor([0.2, 0.1], requires_grad=True)
    loss = reward_control.cpo_loss(winner, torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.1]),
                                   torch.tensor([0.1, 0.1]), 5000.0, 1e-2, torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(winner.grad, torch.zeros(2))


def build_cpo_data(world: Path, out: Path, task: str = "canny", rows: int = 6, *extra: str):
    dataset = {"canny": "MultiGen-20M_train", "depth": "MultiGen-20M_depth"}[task]
    flags = ["train/build_cpo_data.py", "--task_name", task, "--dataset_name", str(world / "datasets" / dataset),
             "--model_path", str(world / "toy-controlnet"), "--sd_path", str(world / "toy-sd15"),
             "--resolution", "64", "--num_inference_steps", "2", "--max_samples", str(rows), "--output_dir", str(out),
             *extra]
    if task == "depth":
        flags += ["--reward_model_name_or_path", str(world / "reward_models" / "dpt-hybrid-midas")]
    return run_entry(flags)


@pytest.mark.parametrize("task", ["canny", "depth"])
def test_preference_data_holds_the_rows_with_eval_conditions_as_winner_and_loser(toy_world, tmp_path, task):
    import datasets
    from PIL import Image

    out = tmp_path / "cpo"
    build_cpo_data(toy_world, out, task, 5)
    built = datasets.load_from_disk(str(out / "dataset"))["train"]
    source = datasets.load_from_disk(str(toy_world / "datasets" / ("MultiGen-20M_train" if task == "canny"
                                                                     else "MultiGen-20M_depth")))["train"]
    assert len(built) == 5
    assert set(built.column_names) == set(source.column_names) | {f"winner_{task}", f"loser_{task}"}
    generations = out / "generations"
    for row in range(5):
        example = built[row]
        assert example["text"] == source[row]["text"]
        assert np.array_equal(np.asarray(example["image"]), np.asarray(source[row]["image"]))
        # The loser is eval.py's condition of the generation, byte for byte as an image.
        loser = np.asarray(Image.open(generations / "conditions" / "group_0" / f"{row}.png"))
        assert np.array_equal(np.asarray(example[f"loser_{task}"]), loser)
        if task == "canny":  # computed condition: the stored annotation of the real image
            winner = np.asarray(Image.open(generations / "annotations" / f"{row}.png"))
        else:  # a condition column: the row's own image, untouched
            winner = np.asarray(source[row]["control_depth"])
        assert np.array_equal(np.asarray(example[f"winner_{task}"]), winner)


def test_preference_data_resumes_without_generating_again_and_replaces_a_partial_dataset(toy_world, tmp_path):
    import datasets

    out = tmp_path / "cpo"
    build_cpo_data(toy_world, out, "canny", 4)
    first = datasets.load_from_disk(str(out / "dataset"))["train"]
    # A dataset write killed half-way leaves only the temporary folder: the next run replaces it.
    (out / ".dataset.partial").mkdir()
    (out / ".dataset.partial" / "junk").write_text("killed")
    result = build_cpo_data(toy_world, out, "canny", 4)
    assert "batches done, 0 to generate" in result.stdout
    assert not (out / ".dataset.partial").exists()
    again = datasets.load_from_disk(str(out / "dataset"))["train"]
    assert [np.asarray(r["loser_canny"]).tolist() for r in again] == [np.asarray(r["loser_canny"]).tolist() for r in first]


def test_preference_data_refuses_eval_flags_it_sets_itself(toy_world, tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "train/build_cpo_data.py", "--task_name", "canny", "--num_groups", "2",
                             "--output_dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--num_groups is 1 here" in result.stderr


# ----------------------------------------------------------------------------------------------
# The step and the runs, on a preference dataset built by train/build_cpo_data.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpo_dataset(toy_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpo_data")
    build_cpo_data(toy_world, out, "canny", 12)
    return out / "dataset"


def cpo_flags(world: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--task_name", "canny", "--objective", "cpo", "--pretrained_model_name_or_path", str(world / "toy-sd15"),
            "--controlnet_model_name_or_path", str(world / "toy-controlnet"), "--dataset_name", str(dataset),
            "--caption_column", "text", "--conditioning_image_column", "winner_canny", "--resolution", "64",
            "--train_batch_size", "4", "--beta_dpo", "5000", "--margin", "5e-3", "--grad_scale", "0.05",
            "--output_dir", str(output_dir), "--report_to", "none", *extra]


def cpo_step_inputs(world: Path, dataset: Path, tmp_path: Path):
    from train import reward_control
    from utils.data import collate_rows

    args = reward_control.parse_args(cpo_flags(world, dataset, tmp_path / "out"))
    parts = reward_control.load_stable_diffusion(args, "cpu", torch.float32)
    reference = reward_control.frozen_reference(parts.controlnet, "cpu", torch.float32)
    rows = reward_control.build_train_rows(args, parts.tokenizer)
    return args, parts, reference, collate_rows([rows[i] for i in range(4)])


def test_cpo_flags_find_the_loser_column_by_cpos_rule_and_refuse_what_does_not_apply(toy_world, cpo_dataset, tmp_path):
    from train import reward_control

    args = reward_control.parse_args(cpo_flags(toy_world, cpo_dataset, tmp_path / "out"))
    assert args.loser_conditioning_image_column == "loser_canny"
    defaults = reward_control.parse_args([f for f in cpo_flags(toy_world, cpo_dataset, tmp_path / "o")
                                          if f not in ("--beta_dpo", "5000", "--margin", "5e-3")])
    assert (defaults.beta_dpo, defaults.margin) == (2500.0, 2e-3)  # CPO's script's defaults
    base = cpo_flags(toy_world, cpo_dataset, tmp_path / "out")
    with pytest.raises(ValueError, match="no 'winner' in its name"):
        reward_control.parse_args([*base, "--conditioning_image_column", "image"])
    with pytest.raises(ValueError, match="--objective cpo weights the diffusion loss with --grad_scale"):
        reward_control.parse_args([*base, "--diffusion_loss_weight", "0.5"])
    with pytest.raises(ValueError, match="--uncertainty_weighting and --reward_warmup_steps shape the reward"):
        reward_control.parse_args([*base, "--uncertainty_weighting"])
    reward_flags = [f for f in base if f not in ("--objective", "cpo", "--conditioning_image_column", "winner_canny")]
    with pytest.raises(ValueError, match="--beta_dpo is a flag of CPO's objective; add --objective cpo"):
        reward_control.parse_args(reward_flags)


def test_cpo_step_trains_only_the_controlnet_and_never_moves_the_reference(toy_world, cpo_dataset, tmp_path):
    from train import reward_control

    args, parts, reference, batch = cpo_step_inputs(toy_world, cpo_dataset, tmp_path)
    controlnet = parts.controlnet
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in controlnet.state_dict().items()}
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    for step in range(2):
        out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(step),
                                           reference=reference)
        if step == 0:  # before any update the trained copy is the reference: D = D_ref, s = 1/2 exactly
            assert out.logs["cpo_margin"] == out.logs["cpo_reference_margin"]
            assert out.logs["cpo_weight"] == 0.5 and out.logs["cpo_implicit_accuracy"] == 0.0
        assert out.loss.item() == pytest.approx(0.05 * out.diffusion_loss.item() + out.logs["cpo_loss"], rel=1e-6)
        out.loss.backward()
        for frozen in (parts.unet, parts.vae, parts.text_encoder, reference):
            assert all(p.grad is None for p in frozen.parameters())
        grads = [p.grad for p in controlnet.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in controlnet.state_dict().items())
    # After the updates the two copies disagree, so the preference weight moves off 1/2.
    out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(9),
                                       reference=reference)
    assert out.logs["cpo_margin"] != out.logs["cpo_reference_margin"]


def test_identical_winner_and_loser_give_half_the_margin_and_no_preference_gradient(toy_world, cpo_dataset, tmp_path):
    from test_train_step import no_mkldnn

    from train import reward_control

    args, parts, reference, batch = cpo_step_inputs(toy_world, cpo_dataset, tmp_path)
    batch["loser_conditioning_pixel_values"] = batch["conditioning_pixel_values"].clone()
    controlnet = parts.controlnet
    with no_mkldnn():
        out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(0),
                                           reference=reference)
        # D = D_ref = 0, s = 1/2: 0.9 * 1/2 * margin + 0.1 * 1/2 * margin, whatever the timesteps (t > 0 here).
        assert out.logs["cpo_loss"] == pytest.approx(0.5 * args.margin, rel=1e-6)
        out.loss.backward()
        with_preference = [p.grad.clone() for p in controlnet.parameters()]
        controlnet.zero_grad()
        # The same draws without the preference term: the plain loss alone gives the same gradient.
        plain = reward_control.predict_noise(batch, parts, controlnet, args, torch.Generator().manual_seed(0))
        (args.grad_scale * plain.diffusion_loss).backward()
    for a, b in zip(with_preference, (p.grad for p in controlnet.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # CPO averages over the samples with t > 0 only: all at t = 0, the preference term is 0.
    args.timestep_sampling_end = 1
    out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(0),
                                       reference=reference)
    assert out.logs["cpo_loss"] == 0.0


def test_cpo_resumed_run_ends_like_an_uninterrupted_one_and_logs_its_terms(toy_world, cpo_dataset, tmp_path,
                                                                          fresh_accelerate_state):  # noqa: F811
    import json

    from accelerate.state import AcceleratorState, GradientState

    from train import reward_control

    def run(out: Path, steps: int):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        reward_control.main(reward_control.parse_args(cpo_flags(
            toy_world, cpo_dataset, out, "--max_train_steps", str(steps), "--checkpointing_steps", "2",
            "--validation_steps", "100", "--learning_rate", "1e-3", "--use_ema", "--resume_from_checkpoint", "latest",
            "--num_validation_images", "1", "--num_validation_inference_steps", "2")))

    whole, part = tmp_path / "whole", tmp_path / "part"
    run(whole, 4)
    run(part, 2)
    run(part, 4)
    assert_same_weights(whole, part)
    assert_same_weights(whole / "controlnet_ema", part / "controlnet_ema")
    log = [json.loads(line) for line in (whole / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    for key in ("cpo_loss", "cpo_winner_loss", "cpo_loser_loss", "cpo_margin", "cpo_reference_margin",
                "cpo_implicit_accuracy", "cpo_weight", "diffusion_loss"):
        assert all(np.isfinite(entry[key]) for entry in log), key
    assert log[0]["cpo_margin"] == log[0]["cpo_reference_margin"] and log[0]["cpo_weight"] == 0.5
    config = json.loads((whole / "training_config.json").read_text())
    assert config["objective"] == "cpo" and config["loser_conditioning_image_column"] == "loser_canny"


def test_cpo_under_bf16_the_reference_computes_what_the_trained_copy_computes(toy_world, cpo_dataset, tmp_path,
                                                                           fresh_accelerate_state):  # noqa: F811
    """--mixed_precision bf16 (the CPU's half dtype; fp16 on GPUs goes the same way): the reference runs
    under the autocast accelerate gives the trained copy, so before the first update D = D_ref exactly
    and the preference weight is exactly 1/2 (a reference in another precision would tilt it)."""
    import json

    from train import reward_control

    out = tmp_path / "bf16"
    reward_control.main(reward_control.parse_args(cpo_flags(
        toy_world, cpo_dataset, out, "--mixed_precision", "bf16", "--max_train_steps", "2", "--checkpointing_steps",
        "100", "--validation_steps", "100", "--learning_rate", "1e-3")))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["cpo_margin"] == log[0]["cpo_reference_margin"] and log[0]["cpo_weight"] == 0.5
    assert all(np.isfinite(entry["cpo_loss"]) for entry in log)


def test_cpo_launcher_on_two_processes(toy_world, cpo_dataset, tmp_path):
    """train/cpo_canny.sh as users run it, CPU-sized: 2 gloo processes (DDP sees two forwards of the
    ControlNet per step: the plain loss and the preference pair), EMA as CPO's canny launcher."""
    out = tmp_path / "cpo_canny"
    env = {"SD_PATH": str(toy_world / "toy-sd15"), "CONTROLNET_PATH": str(toy_world / "toy-controlnet"),
           "DATASET": str(cpo_dataset), "OUTPUT_DIR": str(out), "NUM_PROCESSES": "2", "RESOLUTION": "64",
           "TRAIN_BATCH_SIZE": "2", "GRAD_ACCUM": "1", "MAX_TRAIN_STEPS": "2", "CHECKPOINTING_STEPS": "2",
           "VALIDATION_STEPS": "2", "NUM_WORKERS": "0"}
    result = run_entry(["-c", "import subprocess, sys; sys.exit(subprocess.call(['bash', 'train/cpo_canny.sh', "
                        "'--caption_column', 'text', '--num_validation_images', '1', "
                        "'--num_validation_inference_steps', '2', '--report_to', 'none']))"], env=env)
    assert "--objective cpo" in result.stdout and "--beta_dpo 5000" in result.stdout
    assert "--margin 5e-3" in result.stdout and "--use_ema" in result.stdout
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "controlnet_ema").is_dir()
    assert (out / "validation" / "step-2" / "sample-0.png").is_file()
