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
