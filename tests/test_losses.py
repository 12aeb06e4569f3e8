"""The diffusion loss of the training step, against the DDPM formulas worked out by hand.

abar_t is recomputed here in float64 from SD1.5's scheduler config (scaled-linear betas), not read
from the scheduler the code uses; x_t, the epsilon and v targets and the MSE are written out
(Ho et al. 2020; Salimans & Ho 2022 for v = sqrt(abar) eps - sqrt(1 - abar) x0). Also: the
sampled timesteps stay in --timestep_sampling_start/end, the logged rewarded fraction is the
share of those timesteps inside the window, and ranks draw different noise.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_train_step import build_step_inputs

TIMESTEPS = torch.tensor([3, 250, 999])


def sd15_alphas_cumprod(config) -> np.ndarray:
    """abar_t in float64 from the scheduler config (diffusers' 'scaled_linear' = SD1.5)."""
    assert config.beta_schedule == "scaled_linear"
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps) ** 2
    return np.cumprod(1.0 - betas)


def _by_hand(prediction, scheduler_config):
    abar = torch.from_numpy(sd15_alphas_cumprod(scheduler_config)[prediction.timesteps.numpy()])
    abar = abar.view(-1, 1, 1, 1)
    x0, eps = prediction.latents.double(), prediction.noise.double()
    return abar, x0, eps


@pytest.fixture(scope="module")
def canny_inputs(toy_world, tmp_path_factory):
    return build_step_inputs(toy_world, "canny", tmp_path_factory.mktemp("losses"), 3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_the_mse_to_the_noise_or_the_velocity(canny_inputs, prediction_type):
    from diffusers import DDPMScheduler

    from train import reward_control

    args, parts, reward_model, batch = canny_inputs
    parts = reward_control.StableDiffusionParts(**{**vars(parts), "noise_scheduler": DDPMScheduler.from_config(
        parts.noise_scheduler.config, prediction_type=prediction_type)})
    with torch.no_grad():
        prediction = reward_control.predict_noise(batch, parts, parts.controlnet, args, torch.Generator().manual_seed(0),
                                            reward_model, TIMESTEPS)
    abar, x0, eps = _by_hand(prediction, parts.noise_scheduler.config)
    # The noised latent: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    torch.testing.assert_close(prediction.noisy_latents.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    expected = ((prediction.model_pred.double() - target) ** 2).mean()
    assert prediction.diffusion_loss.dtype == torch.float32
    assert prediction.diffusion_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Not a coincidence of the numbers: the clean latents as the target give another loss.
    wrong = ((prediction.model_pred.double() - x0) ** 2).mean()
    assert abs(wrong.item() - expected.item()) > 0.01 * expected.item()


def test_diffusion_target_function_against_the_formula():
    from diffusers import DDPMScheduler

    from utils.diffusion import diffusion_target

    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    eps_scheduler = DDPMScheduler(**config, prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps_scheduler, latents, noise, TIMESTEPS), noise)
    v_scheduler = DDPMScheduler(**config, prediction_type="v_prediction")
    abar = torch.from_numpy(sd15_alphas_cumprod(v_scheduler.config)[TIMESTEPS.numpy()]).view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise.double() - (1 - abar).sqrt() * latents.double()
    torch.testing.assert_close(diffusion_target(v_scheduler, latents, noise, TIMESTEPS).double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_step_loss_weights_the_diffusion_loss(toy_world, tmp_path):
    """loss = diffusion_loss_weight * diffusion + grad_scale * reward; here no sample is rewarded."""
    from train import reward_control

    args, parts, reward_model, batch = build_step_inputs(toy_world, "canny", tmp_path, 2,
                                                         "--diffusion_loss_weight", "0.25")
    with torch.no_grad():
        out = reward_control.training_step(batch, parts, parts.controlnet, args, torch.Generator().manual_seed(0),
                                     reward_model, timesteps=torch.tensor([500, 900]))
    assert out.reward_loss.item() == 0 and out.diffusion_loss.item() > 0
    assert out.loss.item() == pytest.approx(0.25 * out.diffusion_loss.item(), rel=1e-6)


def test_sampled_timesteps_stay_in_range_and_the_rewarded_fraction_counts_them(toy_world, tmp_path):
    from train import reward_control

    args, parts, reward_model, batch = build_step_inputs(
        toy_world, "canny", tmp_path, 4, "--timestep_sampling_start", "300", "--timestep_sampling_end", "310",
        "--min_timestep_rewarding", "300", "--max_timestep_rewarding", "304")
    seen, fractions = [], []
    with torch.no_grad():
        for seed in range(6):
            prediction = reward_control.predict_noise(batch, parts, parts.controlnet, args,
                                                torch.Generator().manual_seed(seed), reward_model)
            t = prediction.timesteps.tolist()
            seen += t
            out = reward_control.training_step(batch, parts, parts.controlnet, args, torch.Generator().manual_seed(seed),
                                         reward_model)
            expected = sum(300 <= value <= 304 for value in t) / len(t)
            assert out.rewarded_fraction == pytest.approx(expected), (t, out.rewarded_fraction)
            fractions.append(expected)
    assert all(300 <= value < 310 for value in seen), seen
    assert len(set(seen)) >= 5  # drawn, not a constant
    assert any(0 < f < 1 for f in fractions)  # the fraction test above was not all-or-nothing


def test_ranks_draw_different_noise_and_a_rank_redraws_the_same(canny_inputs):
    from train import reward_control

    args, parts, reward_model, batch = canny_inputs
    noises = {}
    with torch.no_grad():
        for rank in (0, 1, 0):
            generator = reward_control.step_generator(args.seed, rank, 7, 1, "cpu")
            prediction = reward_control.predict_noise(batch, parts, parts.controlnet, args, generator, reward_model)
            noises.setdefault(rank, []).append(prediction.noise)
    assert torch.equal(noises[0][0], noises[0][1])
    assert not torch.allclose(noises[0][0], noises[1][0])
    # ... and the next micro-batch of the same rank and step draws other noise too.
    other = reward_control.step_generator(args.seed, 0, 7, 2, "cpu")
    with torch.no_grad():
        again = reward_control.predict_noise(batch, parts, parts.controlnet, args, other, reward_model).noise
    assert not torch.allclose(again, noises[0][0])
