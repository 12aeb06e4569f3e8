"""toy/committed.py: the shipped pretrained world restores byte for byte, and damage is named.

A bundle is made here from a small pretrained world (test_toy_pretrain's fixture); its restore
must give the same bytes as the world it came from (the datasets are regenerated, not shipped).
The bundle shipped in toy/weights is checked against its own SHA256SUMS and loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import toy.committed as committed
from test_toy_pretrain import _files


@pytest.fixture(scope="module")
def bundle(pretrained, tmp_path_factory):
    world, _ = pretrained
    folder = tmp_path_factory.mktemp("bundle") / "weights"
    committed.update(world, bundle=folder)
    return world, folder


def test_the_bundle_leaves_out_the_datasets_and_restores_the_same_bytes(bundle, tmp_path):
    world, folder = bundle
    shipped = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not any(name.startswith("datasets/") for name in shipped)
    assert {name for name in _files(world) if not name.startswith("datasets/")} <= shipped
    out = tmp_path / "restored"
    manifest = committed.restore(out, bundle=folder)
    original, restored = _files(world), _files(out)
    # Every file of the world, datasets included, with the same bytes; only the manifest differs
    # (it records the bundle it came from).
    assert restored.keys() == original.keys()
    assert [name for name in original if name != "toy_world.json" and original[name] != restored[name]] == []
    assert manifest[committed.RESTORED_KEY] == committed.bundle_digest(folder)
    assert committed.is_restored(out, bundle=folder)
    before = (out / "toy_world.json").stat().st_mtime_ns
    committed.restore(out, bundle=folder)  # already there: nothing rewritten
    assert (out / "toy_world.json").stat().st_mtime_ns == before


def test_a_damaged_bundle_is_named_and_nothing_is_written(bundle, tmp_path):
    import shutil

    _, folder = bundle
    damaged = tmp_path / "weights"
    shutil.copytree(folder, damaged)
    target = damaged / "toy-sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    target.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    out = tmp_path / "restored"
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors.*Git LFS pointer"):
        committed.restore(out, bundle=damaged)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
    target.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        committed.restore(out, bundle=damaged)


def test_refuses_to_replace_a_folder_that_is_not_a_toy_world(bundle, tmp_path):
    _, folder = bundle
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a toy world"):
        committed.restore(tmp_path, bundle=folder)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_update_refuses_a_random_world(toy_world, tmp_path):
    with pytest.raises(ValueError, match="no 'pretrained' section"):
        committed.update(toy_world, bundle=tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_the_shipped_world_matches_its_sums_and_has_every_baseline():
    from toy.experiment import TASKS

    sums = committed.check_bundle()
    manifest = json.loads((committed.BUNDLE / "toy_world.json").read_text())
    assert manifest["architecture"] == "f4" and manifest["pretrained"]["budget"] == "full"
    for task in TASKS:
        assert f"controlnets/{task}/diffusion_pytorch_model.safetensors" in sums, task
    size = sum((committed.BUNDLE / name).stat().st_size for name in sums)
    assert size < 50 * 2**20, f"toy/weights is {size / 2**20:.1f} MiB; the issue's budget is ~50 MB"


def test_the_shipped_world_restores_and_its_canny_controlnet_loads(tmp_path):
    """The quickstart's world: restored without training, its canny baseline loads in the pipeline."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    out = tmp_path / "world"
    committed.restore(out)
    controlnet = ControlNetModel.from_pretrained(out / "controlnets" / "canny")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(out / "toy-sd15", controlnet=controlnet,
                                                             safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4
    assert (out / "datasets" / "MultiGen-20M_canny_eval" / "dataset_dict.json").is_file()
    assert torch.isfinite(next(controlnet.parameters())).all()
