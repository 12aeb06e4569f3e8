"""Exponential moving average of the trainable ControlNet, kept apart from the training weights.

The original release validated by copying the EMA weights into the training ControlNet on rank 0
and never restoring them (defect 3 of docs/REFERENCE): rank 0 then trained from the EMA weights
while the other ranks did not. Here the only way to run a model with EMA weights is the
``swapped_into`` context manager, which puts the training weights back bit-identically.

The EMA is saved as a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
loadable by ``ControlNetModel.from_pretrained``) plus ``ema_state.json`` with its step count.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

EMA_STATE_FILE = "ema_state.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class ModelEMA:
    """Shadow copy (float32) of a model's parameters, updated after every optimizer step.

    The decay of the update that follows n earlier ones is diffusers' ``EMAModel`` schedule with
    its defaults, which the original release used: 0 for the first update (the average jumps to
    the weights after the first optimizer step), then min(decay, (1 + n) / (10 + n)). Without the
    ramp, a 10k-step run at decay 0.9999 would end with 37% of the *initial* weights in the average.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates  # diffusers: step = optimization_step - 1, decay 0 while step <= 0
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Run ``model`` with the EMA weights inside the block; the training weights come back exactly."""
        params = dict(model.named_parameters())
        stored = {name: params[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, value in self.shadow.items():
                    params[name].copy_(value.to(params[name].dtype))
            yield model
        finally:
            with torch.no_grad():
                for name, value in stored.items():
                    params[name].copy_(value)

    def save_pretrained(self, model, out_dir: str | Path) -> None:
        """Write a diffusers folder holding the EMA weights (``model`` supplies config and buffers)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        state.update({name: value.cpu() for name, value in self.shadow.items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        model.save_config(str(out_dir))
        (out_dir / EMA_STATE_FILE).write_text(json.dumps({"decay": self.decay, "num_updates": self.num_updates}) + "\n")

    def load_pretrained(self, in_dir: str | Path) -> None:
        """Restore shadow weights and step count written by ``save_pretrained``."""
        from safetensors.torch import load_file

        in_dir = Path(in_dir)
        if not in_dir.is_dir():
            raise FileNotFoundError(
                f"{in_dir} is missing: this checkpoint was saved without --use_ema. "
                "Resume without --use_ema, or from a checkpoint saved with it."
            )
        if not (in_dir / WEIGHTS_FILE).is_file():  # the folder exists: its write was cut short
            raise FileNotFoundError(
                f"{in_dir / WEIGHTS_FILE} is missing although {in_dir.name}/ exists: the checkpoint is incomplete "
                "(its write was interrupted). Resume from an earlier checkpoint."
            )
        weights = load_file(str(in_dir / WEIGHTS_FILE))
        missing = sorted(set(self.shadow) - set(weights))
        if missing:
            raise KeyError(f"{in_dir / WEIGHTS_FILE} lacks {len(missing)} ControlNet parameters (first: {missing[0]}).")
        for name in self.shadow:
            self.shadow[name].copy_(weights[name].float())
        state_file = in_dir / EMA_STATE_FILE
        if state_file.is_file():
            self.num_updates = int(json.loads(state_file.read_text())["num_updates"])

    def to(self, device) -> "ModelEMA":
        self.shadow = {name: value.to(device) for name, value in self.shadow.items()}
        return self
