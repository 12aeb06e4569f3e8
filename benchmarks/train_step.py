"""Time and peak memory of one reward step: this implementation vs the original formulation vs no reward.

    python benchmarks/train_step.py                     # toy size (seconds)
    python benchmarks/train_step.py --real_shapes       # SD1.5 shapes, random weights, 256 px (minutes on CPU)

Variants, each measured in a fresh subprocess on the same models (same seed) and the same batch:
    floor     the step without any reward (diffusion loss only): the cost that cannot be avoided
    original  the original release's formulation: x0 with ``scheduler.step`` in a Python loop per
              sample (defect 7), the whole batch decoded by the VAE and scored by the reward model,
              then masked (defect 6)
    ours      train/reward_control.py: vectorised x0, decode and score only the samples in the window
    cpo       --objective cpo (docs/CPO.md): the plain diffusion loss plus winner and loser conditions
              through the trained ControlNet (with gradient) and its frozen reference (without); what
              CPO costs per step against ControlNet++ ("ours"), printed as ratios without a target
Batch 4 with exactly one sample inside the reward window (t = 50 of 50 / 400 / 700 / 950), the
~25% a uniform t in [0, 1000) with window 0..200 gives on average. One step = forward +
backward through the trainable ControlNet (no optimizer step: identical in all variants).

Time: median over --repeats steps after --warmup; wall clock, and on CPU also the process's CPU
time (all threads), which a machine shared with other jobs disturbs much less: the CPU ratios are
the ones judged on CPU. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the step;
on CPU the process's resident-set high-water mark (VmHWM) reset just before the step, minus the
resident set before it (at toy size this is a few MiB and mostly allocator noise).
Targets (issue): ours <= 0.45x the original's time and <= 0.75x its peak memory, and <= 1.35x
the floor's time.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from train import reward_control  # noqa: E402

VARIANTS = ("floor", "original", "ours", "cpo")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIMESTEPS = (50, 400, 700, 950)  # exactly one sample inside the window 0..200
TEXT_TOKENS = 77


def original_reward_loss(batch, parts, prediction, args, reward_model):
    """The original release's reward term: per-sample ``scheduler.step`` for x0, the whole batch
    decoded and scored, then masked: sum_i(mask_i * r_i) / (sum_i mask_i + 1e-10)."""
    from utils.diffusion import reward_window_mask

    scheduler, vae = parts.noise_scheduler, parts.vae
    x0 = torch.cat([
        scheduler.step(prediction.model_pred[i : i + 1], prediction.timesteps[i], prediction.noisy_latents[i : i + 1],
                       generator=torch.Generator(device=prediction.model_pred.device).manual_seed(0)
                       ).pred_original_sample
        for i in range(prediction.model_pred.shape[0])
    ])
    images = vae.decode(x0.to(parts.weight_dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1)
    per_sample = reward_model.loss(reward_model(images), reward_model.target(batch))
    mask = reward_window_mask(prediction.timesteps, args.min_timestep_rewarding, args.max_timestep_rewarding)
    return (mask.float() * per_sample).sum() / (mask.float().sum() + 1e-10), mask


def original_training_step(batch, parts, controlnet, args, generator, reward_model, timesteps=None):
    """``training_step`` with the original release's reward term (same noise, same diffusion loss)."""
    prediction = reward_control.predict_noise(batch, parts, controlnet, args, generator, reward_model, timesteps)
    reward_loss, mask = original_reward_loss(batch, parts, prediction, args, reward_model)
    loss = args.diffusion_loss_weight * prediction.diffusion_loss + args.grad_scale * reward_loss
    return reward_control.StepOutput(loss, prediction.diffusion_loss.detach(), reward_loss.detach(),
                               mask.float().mean().item())


# --------------------------------------------------------------------------------------------
# Models with random weights, built from configs written here (nothing is downloaded)
# --------------------------------------------------------------------------------------------


def build_models(real_shapes: bool, device: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Frozen SD parts + a trainable ControlNet; SD1.5's configs with ``real_shapes``, tiny otherwise.

    The text encoder is one CLIP layer at SD1.5's width in both cases: it runs once, without
    gradient, identically in every variant, so its depth does not affect the comparison.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if real_shapes:  # runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
        )
        text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                     num_hidden_layers=1, max_position_embeddings=TEXT_TOKENS)
    else:  # the toy world's shapes (toy/world.py)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
        )
        text_config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                     num_hidden_layers=1, max_position_embeddings=TEXT_TOKENS)
    text_encoder = CLIPTextModel(text_config)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)
                                           if real_shapes else (8, 16, 16, 32))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")
    for frozen in (unet, vae, text_encoder):  # frozen models in the mixed-precision dtype, as in training
        frozen.requires_grad_(False).eval().to(device, dtype)
    controlnet.train().to(device)  # trainable weights stay fp32 (autocast computes in dtype)
    return reward_control.StableDiffusionParts(None, scheduler, text_encoder, vae, unet, controlnet, dtype)


def build_reward_model(name: str, real_shapes: bool, device: str):
    from reward_models.canny import CannyRewardModel
    from reward_models.hed import HEDRewardModel

    torch.manual_seed(1)
    model = CannyRewardModel(device=device) if name == "canny" else HEDRewardModel(width=64 if real_shapes else 8)
    return model.to(device).freeze()


def build_batch(resolution: int, batch_size: int, device: str, seed: int = 2) -> dict:
    """Smooth random images (a blurred noise field) so that edge detectors see structure."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, resolution // 8, resolution // 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear",
                                             align_corners=False)
    input_ids = torch.randint(0, 1000, (batch_size, TEXT_TOKENS), generator=generator)
    return {"pixel_values": (images * 2 - 1).to(device), "input_ids": input_ids.to(device),
            "index": torch.arange(batch_size, device=device)}


# --------------------------------------------------------------------------------------------
# Measuring one variant (in its own process)
# --------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only on CPU).")


def measure(variant: str, options) -> dict:
    device = "cuda" if torch.cuda.is_available() and not options.cpu else "cpu"
    torch.set_num_threads(options.threads)
    dtype = DTYPES[options.mixed_precision]
    parts = build_models(options.real_shapes, device, dtype=dtype)
    reward_model = build_reward_model(options.reward, options.real_shapes, device).to(dtype)
    batch = build_batch(options.resolution, len(TIMESTEPS), device)
    # The ControlNet condition is given with the batch in every variant (as depth/segmentation
    # read it from the dataset), so that the floor, which has no reward model, does the same work.
    with torch.no_grad():
        batch["conditioning_pixel_values"] = reward_model.extract_condition((batch["pixel_values"] + 1) / 2)
    timesteps = torch.tensor(TIMESTEPS, device=device)
    args = SimpleNamespace(timestep_sampling_start=0, timestep_sampling_end=1000, min_timestep_rewarding=0,
                           max_timestep_rewarding=200, diffusion_loss_weight=1.0, grad_scale=1.0)
    controlnet = parts.controlnet
    reference = None
    if variant == "cpo":  # a loser condition that differs from the winner: the condition of the flipped image
        with torch.no_grad():
            batch["loser_conditioning_pixel_values"] = batch["conditioning_pixel_values"].flip(-1)
        args.beta_dpo, args.margin = 5000.0, 5e-3
        reference = reward_control.frozen_reference(controlnet, device, dtype)

    def step():
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = forward(generator)
        out.loss.backward()
        controlnet.zero_grad(set_to_none=True)
        return out

    def forward(generator):
        if variant == "floor":
            out = reward_control.training_step(batch, parts, controlnet, args, generator, None, timesteps)
        elif variant == "ours":
            out = reward_control.training_step(batch, parts, controlnet, args, generator, reward_model, timesteps)
        elif variant == "cpo":
            out = reward_control.training_step(batch, parts, controlnet, args, generator, None, timesteps,
                                               reference=reference)
        else:
            out = original_training_step(batch, parts, controlnet, args, generator, reward_model, timesteps)
        return out

    for _ in range(options.warmup):
        step()
    times, cpu_times, peaks = [], [], []
    for _ in range(options.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _rss_kib("VmRSS") * 1024
        start, cpu_start = time.perf_counter(), time.process_time()
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
        peaks.append(peak - before)
    return {"variant": variant, "device": device, "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "peak_bytes": max(peaks),
            "loss": out.loss.item(), "reward_loss": out.reward_loss.item()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real_shapes", action="store_true", help="SD1.5's UNet/VAE/ControlNet shapes (random weights).")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (toy) / 256 (real shapes).")
    parser.add_argument("--reward", choices=["canny", "hed"], default="canny")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (median); default 5 toy / 1 real.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--cpu", action="store_true", help="measure on CPU even when CUDA is available.")
    parser.add_argument("--mixed_precision", choices=list(DTYPES), default="no",
                        help="frozen models in this dtype and the step under autocast, as training with "
                             "--mixed_precision does (GPU); the ControlNet's weights stay fp32.")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # child process
    options = parser.parse_args(argv)
    options.resolution = options.resolution or (256 if options.real_shapes else 64)
    options.repeats = options.repeats or (1 if options.real_shapes else 5)

    if options.variant is not None:
        print(json.dumps(measure(options.variant, options)))
        return {}
    results = {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for variant in VARIANTS:  # a fresh process each: peak memory of one variant is not the others'
        # Idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        child = subprocess.run([sys.executable, __file__, *forwarded, "--variant", variant],
                               capture_output=True, text=True, env=env)
        if child.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{child.stderr[-4000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])

    shape = "SD1.5 shapes, random weights" if options.real_shapes else "toy shapes"
    print(f"One reward step ({shape}, {options.resolution} px, batch {len(TIMESTEPS)}, t = {TIMESTEPS}, "
          f"window 0..200, reward {options.reward}, {results['ours']['device']}, mixed precision "
          f"{options.mixed_precision}, median of {options.repeats})")
    print(f"{'variant':<10}{'wall (s)':>12}{'CPU (s)':>12}{'peak (MiB)':>14}{'loss':>12}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:<10}{r['time_s']:>12.3f}{r['cpu_s']:>12.3f}{r['peak_bytes'] / 2**20:>14.1f}{r['loss']:>12.5f}")
    ours, original, floor = results["ours"], results["original"], results["floor"]
    # On a shared CPU machine wall time depends on the neighbours' load; the process's CPU time
    # (all its threads) does much less, so the CPU ratios are the ones judged there.
    clock = "time_s" if ours["device"] == "cuda" else "cpu_s"
    name = "wall" if clock == "time_s" else "CPU time"
    ratios = {
        f"{name} ours/original": (ours[clock] / original[clock], 0.45),
        "peak ours/original": (ours["peak_bytes"] / max(original["peak_bytes"], 1), 0.75),
        f"{name} ours/floor": (ours[clock] / floor[clock], 1.35),
    }
    if clock == "cpu_s":
        print(f"(wall-clock ratios: ours/original {ours['time_s'] / original['time_s']:.3f}, "
              f"ours/floor {ours['time_s'] / floor['time_s']:.3f})")
    for name, (value, target) in ratios.items():
        print(f"{name:<26}{value:>8.3f}   target <= {target:<5} {'ok' if value <= target else 'MISSED'}")
    cpo = results["cpo"]
    print(f"{'CPO vs ControlNet++ (ours)':<28}{'wall' if clock == 'time_s' else 'CPU time'} {cpo[clock] / ours[clock]:.3f}x, peak "
          f"{cpo['peak_bytes'] / max(ours['peak_bytes'], 1):.3f}x (plus one frozen ControlNet's weights: the reference)")
    print(f"same loss (ours vs original): |diff| = {abs(ours['loss'] - original['loss']):.2e}"
          + (" (canny's non-maximum suppression can flip a pixel on ~1e-6 decoder rounding differences "
             "between batch sizes)" if options.reward == "canny" else ""))
    return results


if __name__ == "__main__":
    main()
