"""Ctrl-U's uncertainty-aware reward (--uncertainty_weighting) and the reward weight warm-up."""
from __future__ import annotations

import json

import pytest
import torch

from test_train_e2e import SHORT_RUN, fresh_accelerate_state  # noqa: F401 (fixture)
from test_train_step import build_step_inputs, load_entry, needs_mmseg, toy_flags


class _Dense:
    """The base class's dense-map behaviour (MSE pixel loss, absolute-difference disagreement)."""

    from reward_models.base import RewardModel

    pixel_loss = RewardModel.pixel_loss
    disagreement = RewardModel.disagreement


def test_identical_readings_give_the_plain_reward():
    """U = 0 where both timesteps read the same: exp(-0) * loss + 0 == the ControlNet++ loss."""
    from reward_models.base import RewardModel

    generator = torch.Generator().manual_seed(0)
    output, target = torch.rand(3, 1, 8, 8, generator=generator), torch.rand(3, 1, 8, 8, generator=generator)
    model = _Dense()
    per_sample, mean_u = RewardModel.uncertainty_weighted_loss(model, output, output.clone(), target)
    torch.testing.assert_close(per_sample, RewardModel.loss(model, output, target))
    assert mean_u == 0.0


def test_disagreeing_pixels_are_down_weighted_and_u_is_added():
    from reward_models.base import RewardModel

    output = torch.zeros(1, 1, 2, 2)
    target = torch.ones(1, 1, 2, 2)  # pixel loss 1 everywhere
    later = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])  # the last pixel disagrees by 2
    per_sample, mean_u = RewardModel.uncertainty_weighted_loss(_Dense(), output, later, target, scale=0.5)
    u = torch.tensor([0.0, 0.0, 0.0, 1.0])  # 0.5 * |0 - 2|
    expected = (torch.exp(-u) * 1.0 + u).mean()
    torch.testing.assert_close(per_sample, expected.reshape(1))
    assert mean_u == pytest.approx(0.25)


def test_segmentation_disagreement_is_the_kl_of_the_class_distributions():
    from reward_models.segmentation import SegmentationRewardModel

    generator = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 4, 4, generator=generator), torch.randn(2, 5, 4, 4, generator=generator)
    kl = SegmentationRewardModel.disagreement(None, p, q)
    expected = torch.nn.functional.kl_div(q.log_softmax(1), p.log_softmax(1), log_target=True,
                                          reduction="none").sum(1)
    torch.testing.assert_close(kl, expected)
    assert torch.all(SegmentationRewardModel.disagreement(None, p, p).abs() < 1e-6)


@pytest.mark.parametrize("key", ["hed", "ade20k"])
def test_ctrl_u_step_gives_the_controlnet_a_gradient_through_both_timesteps(toy_world, tmp_path, key, monkeypatch):
    """The second prediction noises the *same* clean latent with the *same* noise to t + k
    (x_{t+k} = sqrt(abar) x0 + sqrt(1 - abar) eps, written out here) and the loss has a gradient
    through it, not only through the first prediction."""
    needs_mmseg(key)
    from train import reward_control

    args, parts, reward_model, batch = build_step_inputs(
        toy_world, key, tmp_path, 3, "--diffusion_loss_weight", "0", "--uncertainty_weighting",
        "--max_timestep_rewarding", "400", "--uncertainty_timestep_offset", "50")
    calls = []
    real_controlled_unet = reward_control.controlled_unet

    def recording(parts_, controlnet_, noisy_latents, timesteps, *rest):
        output = real_controlled_unet(parts_, controlnet_, noisy_latents, timesteps, *rest)
        call = {"noisy_latents": noisy_latents.detach().clone(), "timesteps": timesteps.clone(), "grad": []}
        if output.requires_grad:
            output.register_hook(lambda grad: call["grad"].append(grad))
        calls.append(call)
        return output

    monkeypatch.setattr(reward_control, "controlled_unet", recording)
    controlnet = parts.controlnet
    controlnet.zero_grad(set_to_none=True)
    seen = {}
    real_predict_noise = reward_control.predict_noise
    monkeypatch.setattr(reward_control, "predict_noise",
                        lambda *a, **k: seen.setdefault("prediction", real_predict_noise(*a, **k)))
    out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(0), reward_model,
                                 timesteps=torch.tensor([5, 300, 700]))
    assert out.rewarded_fraction == pytest.approx(2 / 3)
    assert out.uncertainty is not None and out.uncertainty > 0  # t and t+50 read differently
    assert torch.isfinite(out.loss) and out.reward_loss.item() > 0

    first, second = calls  # the batch at t, then the rewarded samples at t + 50
    assert first["timesteps"].tolist() == [5, 300, 700] and second["timesteps"].tolist() == [55, 350]
    prediction = seen["prediction"]
    alphas = parts.noise_scheduler.alphas_cumprod.double()[second["timesteps"]].view(-1, 1, 1, 1)
    x0, eps = prediction.latents[:2].double(), prediction.noise[:2].double()
    torch.testing.assert_close(second["noisy_latents"].double(), alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for call in (first, second):
        assert call["grad"] and call["grad"][0].abs().sum().item() > 0, "no gradient through this prediction"
    grad = dict(controlnet.named_parameters())["controlnet_cond_embedding.conv_in.weight"].grad
    assert grad is not None and grad.abs().sum().item() > 0

    # Without the flag the same step is ControlNet++'s: a different loss, no U.
    args.uncertainty_weighting = False
    plain = reward_control.training_step(batch, parts, controlnet, args, torch.Generator().manual_seed(0), reward_model,
                                   timesteps=torch.tensor([5, 300, 700]))
    assert plain.uncertainty is None
    assert plain.reward_loss.item() != out.reward_loss.item()


def test_reward_weight_ramps_linearly_then_stays():
    from types import SimpleNamespace

    from train.reward_control import reward_weight

    args = SimpleNamespace(grad_scale=0.5, reward_warmup_steps=4)
    assert [reward_weight(args, step) for step in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert reward_weight(SimpleNamespace(grad_scale=0.5, reward_warmup_steps=0), 0) == 0.5


@pytest.mark.parametrize("flags, message", [
    (["--uncertainty_timestep_offset", "0"], "--uncertainty_timestep_offset must be >= 1"),
    (["--uncertainty_scale", "0"], "--uncertainty_scale must be > 0"),
    (["--reward_warmup_steps", "-1"], "--reward_warmup_steps must be >= 0"),
    (["--uncertainty_weighting", "--grad_scale", "0"], "raise --grad_scale or drop --uncertainty_weighting"),
])
def test_bad_ctrl_u_flags_are_refused_with_what_to_change(toy_world, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        load_entry("reward_control").parse_args(toy_flags(toy_world, "hed", tmp_path, *flags))


def test_ctrl_u_run_logs_u_and_the_ramped_weight(toy_world, tmp_path, fresh_accelerate_state):
    """Two steps through the script's main: train_log.jsonl holds U and the ramped reward weight."""
    script = load_entry("reward_control")
    out = tmp_path / "out"
    script.main(script.parse_args(toy_flags(
        toy_world, "hed", out, "--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps", "10",
        "--uncertainty_weighting", "--max_timestep_rewarding", "999", "--reward_warmup_steps", "2", *SHORT_RUN)))
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert [line["reward_weight"] for line in lines] == [0.5, 1.0]
    assert all(line["uncertainty"] > 0 and line["rewarded_fraction"] == 1.0 for line in lines)


@pytest.mark.slow
def test_ctrl_u_with_two_processes_and_gradient_checkpointing(toy_world, tmp_path):
    """DDP sees two forwards of the ControlNet before one backward (t and t + k): it must train,
    agree across ranks and resume like an uninterrupted run."""
    from test_train_e2e import assert_same_weights, run_launcher

    flags = ["--max_train_samples", "8", "--learning_rate", "1e-3", "--uncertainty_weighting",
             "--max_timestep_rewarding", "999", "--uncertainty_timestep_offset", "20"]
    env = {"NUM_PROCESSES": "2", "CHECKPOINTING_STEPS": "2", "VALIDATION_STEPS": "10", "OMP_NUM_THREADS": "1"}
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_launcher("reward_hed", toy_world, whole, *flags, "--max_train_steps", "3", env=env)
    run_launcher("reward_hed", toy_world, part, *flags, "--max_train_steps", "2", env=env)
    run_launcher("reward_hed", toy_world, part, *flags, "--max_train_steps", "3", env=env)
    lines = [json.loads(line) for line in (whole / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(line["uncertainty"] > 0 for line in lines)
    assert_same_weights(whole, part)
