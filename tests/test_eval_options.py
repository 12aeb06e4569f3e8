"""eval/ options the default runs do not exercise: --vae_path, --ddim, eval_fid's --real_image_path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_eval import generation_args


def test_vae_path_and_ddim_reach_the_pipeline(toy_world, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, DDIMScheduler, UniPCMultistepScheduler

    from eval import common
    from eval import eval as generate

    monkeypatch.setattr(common, "_REUSED", None)
    vae = AutoencoderKL.from_pretrained(toy_world / "toy-sd15" / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # another VAE: brighter images
    vae.save_pretrained(tmp_path / "other-vae")

    def pipeline(*flags):
        args = generate.parse_args(generation_args(toy_world, "canny", tmp_path / "out")[1:] + list(flags))
        return generate.load_pipeline(args, torch.float32)

    default = pipeline()
    assert type(default.scheduler) is UniPCMultistepScheduler  # the paper's sampler
    assert not torch.equal(default.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    chosen = pipeline("--vae_path", str(tmp_path / "other-vae"), "--ddim")
    assert type(chosen.scheduler) is DDIMScheduler
    # The sampler keeps SD1.5's noise schedule.
    assert chosen.scheduler.config.beta_schedule == default.scheduler.config.beta_schedule == "scaled_linear"
    for name, value in vae.state_dict().items():
        assert torch.equal(chosen.vae.state_dict()[name], value), name


def test_real_image_path_is_what_fid_compares_with(toy_world, tmp_path, monkeypatch):
    from cleanfid import fid

    from eval import common, eval_fid
    from eval import eval as generate
    from utils.data import load_dataset_any

    monkeypatch.setattr(common, "_REUSED", None)
    out = tmp_path / "eval"
    generate.main(generation_args(toy_world, "canny", out, max_samples=6, num_groups=1)[1:])
    # Real images other than the evaluated rows: rows 10..17 of the split, as lossless PNGs.
    real = tmp_path / "real"
    real.mkdir()
    dataset = load_dataset_any(str(toy_world / "datasets" / "MultiGen-20M_canny_eval"), "validation")
    for row in range(10, 18):
        dataset[row]["image"].convert("RGB").save(real / f"{row}.png")
    inception = toy_world / "fid" / "inception-toy.pt"
    common_flags = ["--root_dir", str(out), "--inception_path", str(inception), "--num_workers", "0"]
    with_folder = eval_fid.main(common_flags + ["--real_image_path", str(real)])
    from_dataset = eval_fid.main(common_flags)

    base = torch.jit.load(str(inception)).eval()

    def features(x):  # clean-fid's InceptionV3W.forward, resize_inside=False
        return base.layers.forward((x - 128) / 128).view(x.shape[0], -1)

    expected = fid.compute_fid(str(real), str(out / "images" / "group_0"), mode="clean", custom_feat_extractor=features,
                               num_workers=0, device=torch.device("cpu"), verbose=False)
    assert with_folder["num_real_images"] == 8 and from_dataset["num_real_images"] == 6
    assert with_folder["metrics"]["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert not np.isclose(with_folder["metrics"]["fid"], from_dataset["metrics"]["fid"], rtol=1e-3)
