"""What the reward sees: its loss on single-step estimates at each timestep, and on sampled images.

    python train/reward_by_timestep.py <the reward stage's flags> --dataset_split validation \
        --timesteps 50 100 200 400 600 800 --max_samples 64 --output_dir work_dirs/reward_by_t

ControlNet++ rewards the one-step clean-image estimate of a training image noised to t <= 200
(Sec. 3.3). Whether that can improve what users get, images *sampled* from noise, depends on how
the two compare: if the one-step estimates inside the window already satisfy the reward while
sampled images do not, the reward has little to correct where it acts. This script measures both
on the same rows with the training code's own functions (``predict_noise`` at fixed timesteps,
``decode_x0``, the task's reward model and its loss), no gradient: the mean reward loss of the
one-step estimates at each ``--timesteps`` value (one noise per row, seeded), and of images sampled
by the ControlNet pipeline (UniPC, ``--sampling_steps``, ``--guidance_scale`` (7.5), the evaluation's
negative prompt) from the same captions and conditions. Writes ``<output_dir>/reward_by_timestep.json``.

Two floors come with them, the reward model's own error: the loss of the real images (``real``; 0
for canny, whose target is the real image's own edge map, and the reward model's error on real
images for depth and segmentation, whose targets are dataset labels) and of the real images
through the VAE (``reconstructed``: encoded, the latent distribution's mode decoded), what a
perfect one-step estimate would score; what separates the floors from ``sampled`` is what the
ControlNet could still gain.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

import json

import torch

from train.reward_control import (build_parser, build_train_rows, controlnet_condition, decode_images, decode_x0,
                                  denormalize, load_reward_model, load_stable_diffusion, predict_noise,
                                  resolve_label_column, validate_args)
from utils.data import collate_rows

NEGATIVE_PROMPT = "worst quality, low quality"  # the evaluation's (eval/eval.py)


def parse_args(input_args=None):
    parser = build_parser(__doc__.split("\n")[0], reward=True)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 100, 200, 400, 600, 800])
    parser.add_argument("--max_samples", type=int, default=64, help="rows of --dataset_split to use")
    parser.add_argument("--sampling_steps", type=int, default=20, help="UniPC steps of the sampled images (0: none)")
    args = validate_args(parser.parse_args(input_args))
    if args.guidance_scale is None:  # the reward stage's validation flag: here the sampled images' CFG
        args.guidance_scale = 7.5
    if args.max_samples < 1 or args.sampling_steps < 0 or any(t < 0 for t in args.timesteps):
        parser.error("--max_samples must be >= 1, --sampling_steps >= 0 and --timesteps >= 0")
    return args


@torch.no_grad()
def main(args=None) -> dict:
    args = parse_args(args)
    device, dtype = torch.device("cpu"), torch.float32
    if torch.cuda.is_available():
        device = torch.device("cuda")
    parts = load_stable_diffusion(args, device, dtype)
    controlnet = parts.controlnet.eval()
    reward_model = load_reward_model(args, device, dtype)
    resolve_label_column(args, reward_model)
    rows = build_train_rows(args, parts.tokenizer, reward_model, train=False)
    count = min(args.max_samples, len(rows))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in collate_rows([rows[i] for i in range(count)]).items()}
    target = reward_model.target(batch)
    results = {"rows": count, "one_step": {}, "settings": {k: getattr(args, k) for k in (
        "pretrained_model_name_or_path", "controlnet_model_name_or_path", "dataset_name", "dataset_split",
        "task_name", "reward_model_name_or_path", "resolution", "sampling_steps", "guidance_scale", "seed")}}

    def reward_loss(images: torch.Tensor) -> float:
        return float(reward_model.loss(reward_model(images), target).mean())

    results["real"] = reward_loss(denormalize(batch["pixel_values"]))
    latents = parts.vae.encode(batch["pixel_values"].to(parts.weight_dtype)).latent_dist.mode()
    results["reconstructed"] = reward_loss(decode_images(parts, latents))
    print(f"real images: reward loss {results['real']:.5f}; through the VAE: {results['reconstructed']:.5f}", flush=True)
    for t in args.timesteps:
        generator = torch.Generator(device).manual_seed(args.seed + t)
        prediction = predict_noise(batch, parts, controlnet, args, generator, reward_model,
                                   timesteps=torch.full((count,), t))
        images = decode_x0(parts, prediction.noisy_latents, prediction.model_pred, prediction.timesteps)
        results["one_step"][str(t)] = reward_loss(images)
        print(f"t = {t:4d}: reward loss of the one-step estimates {results['one_step'][str(t)]:.5f}", flush=True)
    if args.sampling_steps:
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        pipe = StableDiffusionControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            controlnet=controlnet, scheduler=UniPCMultistepScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        condition = controlnet_condition(batch, reward_model)
        captions = parts.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        sampled = pipe(prompt=captions, image=condition, negative_prompt=[NEGATIVE_PROMPT] * count,
                       height=args.resolution, width=args.resolution, num_inference_steps=args.sampling_steps,
                       guidance_scale=args.guidance_scale, output_type="pt",
                       generator=torch.Generator(device).manual_seed(args.seed)).images
        results["sampled"] = reward_loss(sampled.to(device))
        print(f"sampled ({args.sampling_steps} UniPC steps, guidance {args.guidance_scale:g}): reward loss "
              f"{results['sampled']:.5f}", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_by_timestep.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
