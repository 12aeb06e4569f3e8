"""Mixed precision, the default on GPUs: bf16 on the CPU here, fp16 where a CUDA device is present.

The frozen models run in the half dtype, the ControlNet keeps fp32 master weights and fp32
gradients, the losses are finite and stay within a stated tolerance of the fp32 step on the same
batch, noise and timesteps; and the training script runs end to end with --mixed_precision bf16.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_train_e2e import SHORT_RUN, fresh_accelerate_state, load_weights  # noqa: F401 (fixture)
from test_train_step import load_entry, toy_flags

# bf16 keeps 8 bits of mantissa (~0.4% per rounding); through the toy UNet, VAE and HED the
# losses move by a few percent at most. A wrong dtype path (e.g. an fp16 overflow, an fp32
# target against a bf16 prediction summed in bf16) moves them far more or makes them non-finite.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.02}
DEVICES = [("cpu", torch.bfloat16),
           pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="fp16 needs a CUDA device"))]


def _step(world, tmp_path, device, dtype):
    from reward_models import build_reward_model
    from train import reward_control
    from utils.data import collate_rows

    args = load_entry("reward_control").parse_args(toy_flags(world, "hed", tmp_path / "out"))
    parts = reward_control.load_stable_diffusion(args, device, dtype)
    reward_model = build_reward_model("hed", args.reward_model_name_or_path, device=device, dtype=dtype)
    rows = reward_control.build_train_rows(args, parts.tokenizer, reward_model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate_rows([rows[0], rows[1],
                                                                                             rows[2]]).items()}
    controlnet = parts.controlnet
    controlnet.zero_grad(set_to_none=True)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        out = reward_control.training_step(batch, parts, controlnet, args, torch.Generator(device).manual_seed(0),
                                     reward_model, timesteps=torch.tensor([5, 150, 700]))
    out.loss.backward()
    return parts, out


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_half_precision_step_keeps_fp32_master_weights_and_matches_fp32(toy_world, tmp_path, device, dtype):
    parts, half = _step(toy_world, tmp_path, device, dtype)
    for frozen in (parts.unet, parts.vae, parts.text_encoder):
        assert frozen.dtype == dtype and not any(p.requires_grad for p in frozen.parameters())
    controlnet = parts.controlnet
    assert all(p.dtype == torch.float32 for p in controlnet.parameters())
    grads = [p.grad for p in controlnet.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    for value in (half.loss, half.diffusion_loss, half.reward_loss):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    assert half.reward_loss.item() > 0 and half.rewarded_fraction == pytest.approx(2 / 3)

    _, full = _step(toy_world, tmp_path, device, torch.float32)
    tolerance = TOLERANCE[dtype]
    for name in ("loss", "diffusion_loss", "reward_loss"):
        ours, reference = getattr(half, name).item(), getattr(full, name).item()
        assert ours == pytest.approx(reference, rel=tolerance), (name, ours, reference)


def test_training_script_with_bf16_autocast_on_the_cpu(toy_world, tmp_path, fresh_accelerate_state):
    script = load_entry("reward_control")
    out = tmp_path / "out"
    script.main(script.parse_args(toy_flags(toy_world, "hed", out, "--max_train_steps", "2", "--mixed_precision",
                                            "bf16", "--max_timestep_rewarding", "999", "--checkpointing_steps", "10",
                                            "--validation_steps", "2", "--num_validation_rows", "1", *SHORT_RUN)))
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(line["skipped_steps"] == 0 for line in lines)
    assert all(line["reward_loss"] > 0 and line["loss"] == line["loss"] for line in lines)  # finite, rewarded
    weights = load_weights(out)
    assert all(value.dtype == torch.float32 for value in weights.values())  # saved from the fp32 master weights
    initial = load_weights(toy_world / "toy-controlnet")
    assert any(not torch.equal(initial[k], weights[k]) for k in initial)
    assert (out / "validation" / "step-2" / "sample-0.png").is_file()
