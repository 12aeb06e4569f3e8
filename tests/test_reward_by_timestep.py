"""train/reward_by_timestep.py: the reward loss of one-step estimates, recomputed independently.

The one-step estimate is rebuilt here with diffusers' own DDPMScheduler.step (pred_original_sample)
from the same latent sample and noise, decoded and scored by the canny reward; the script's value
must match. The floors: the real images' canny loss is 0 by construction (the target is their own
edge map), and the VAE round trip is recomputed with diffusers' AutoencoderKL. The sampled images'
loss is checked to be finite and written.
"""
from __future__ import annotations

import json

import pytest
import torch


def test_one_step_reward_loss_matches_diffusers_and_sampled_images_are_scored(toy_world, tmp_path):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from reward_models import build_reward_model
    from train import reward_by_timestep
    from utils.data import ControlNetRows, collate_rows, load_dataset_any

    sd, dataset = toy_world / "toy-sd15", toy_world / "datasets" / "MultiGen-20M_canny_eval"
    results = reward_by_timestep.main([
        "--pretrained_model_name_or_path", str(sd), "--controlnet_model_name_or_path", str(toy_world / "toy-controlnet"),
        "--dataset_name", str(dataset), "--dataset_split", "validation", "--caption_column", "text",
        "--task_name", "canny", "--reward_model_name_or_path", "canny", "--resolution", "64", "--max_samples", "3",
        "--timesteps", "150", "--sampling_steps", "2", "--seed", "5", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "reward_by_timestep.json").read_text()) == results
    assert results["rows"] == 3 and torch.isfinite(torch.tensor(results["sampled"]))

    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()
    controlnet = ControlNetModel.from_pretrained(toy_world / "toy-controlnet").eval()
    scheduler = DDPMScheduler.from_pretrained(sd / "scheduler")
    reward = build_reward_model("canny", "canny")
    rows = ControlNetRows(load_dataset_any(str(dataset), "validation"), tokenizer, 64, "image", "text", train=False)
    batch = collate_rows([rows[i] for i in range(3)])
    generator = torch.Generator().manual_seed(5 + 150)
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.full((3,), 150)
        noisy = scheduler.add_noise(latents, noise, t)
        condition = reward.extract_condition(batch["pixel_values"] * 0.5 + 0.5)
        text = text_encoder(batch["input_ids"])[0]
        down, mid = controlnet(noisy, t, text, controlnet_cond=condition, return_dict=False)
        eps = unet(noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        x0 = torch.cat([scheduler.step(eps[i:i + 1], 150, noisy[i:i + 1]).pred_original_sample for i in range(3)])
        images = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        expected = float(reward.loss(reward(images), reward.target(batch)).mean())
    assert results["one_step"]["150"] == pytest.approx(expected, rel=1e-4)

    assert results["real"] == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        mode = vae.encode(batch["pixel_values"]).latent_dist.mean
        round_trip = (vae.decode(mode).sample / 2 + 0.5).clamp(0, 1)
        expected = float(reward.loss(reward(round_trip), reward.target(batch)).mean())
    assert expected > 0 and results["reconstructed"] == pytest.approx(expected, rel=1e-4)
