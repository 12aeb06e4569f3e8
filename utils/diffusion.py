"""The diffusion maths of the reward step: noising targets, one-step x0, the reward window.

ControlNet++ (arXiv 2404.07987, Sec. 3.3) scores a *single-step* estimate of the clean image:
the latent is noised to t, the noise is predicted once, and x0 is recovered in closed form.
Everything here is vectorised over the batch: the original release called ``scheduler.step``
in a Python loop, one sample at a time (defect 7 of docs/REFERENCE).
"""
from __future__ import annotations

import torch


def _alphas_cumprod_at(noise_scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t for each sample, shaped (B, 1, ..., 1) to broadcast against ``like``, in float32."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    abar = alphas_cumprod[timesteps.long()]
    return abar.reshape(-1, *([1] * (like.ndim - 1)))


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"unknown prediction_type {prediction_type!r} in the noise scheduler config; "
        "ControlNet++ supports 'epsilon' and 'v_prediction'."
    )


def single_step_x0(noise_scheduler, x_t: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """One-step estimate of the clean latent x0 for the whole batch, without clipping.

    epsilon:      x0 = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)
    v_prediction: x0 = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v_hat

    This equals ``DDPMScheduler.step(...).pred_original_sample`` per sample (with clipping and
    thresholding off, as in SD1.5's config), but in one expression. Computed in float32 and
    returned in ``model_output``'s dtype: under fp16, 1 / sqrt(abar_t) reaches ~13 at t=999.
    """
    abar = _alphas_cumprod_at(noise_scheduler, timesteps, x_t)
    x_t32, out32 = x_t.float(), model_output.float()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0 = (x_t32 - (1 - abar).sqrt() * out32) / abar.sqrt()
    elif prediction_type == "v_prediction":
        x0 = abar.sqrt() * x_t32 - (1 - abar).sqrt() * out32
    else:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r} in the noise scheduler config; "
            "ControlNet++ supports 'epsilon' and 'v_prediction'."
        )
    return x0.to(model_output.dtype)


def reward_window_mask(timesteps: torch.Tensor, min_t: int, max_t: int) -> torch.Tensor:
    """Which samples receive the reward loss: min_t <= t <= max_t (both ends included).

    Only small t is rewarded (paper, Sec. 3.3: t <= 200 of 1000) because only there is the
    one-step image sharp enough for the reward model to judge.
    """
    return (timesteps >= min_t) & (timesteps <= max_t)


def masked_mean_reward(per_sample_reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i(mask_i * r_i) / (sum_i mask_i + 1e-10): the paper's reward loss over the full batch.

    ``per_sample_reward`` holds r_i for the rewarded samples only (in batch order, as selected
    by ``mask``); the denominator still counts them from the full batch mask, so the value is
    exactly the original full-batch formulation while the rejected 80% are never decoded.
    """
    return per_sample_reward.float().sum() / (mask.sum().float() + 1e-10)
