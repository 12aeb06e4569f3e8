"""inference/generate.py and what it shares with the demo (inference/generation.py, paths.py, models.py)
on the toy world.

The generator runs in-process through `generate.main(argv)` (the entry point's own code, without
paying a Python start-up per test) and once as a real subprocess. Assertions are on the files
written: their sizes, that the saved condition is the annotator's output for the input image,
that a resumed batch leaves done rows untouched and regenerates deleted outputs identically.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import app, generate, generation, models, paths
from inference.generation import InferenceError
from conftest import OFFLINE_ENV, REPO_ROOT

FAST = ["--steps", "2", "--num_images", "2"]
# Offline, and one thread: the toy models are too small to gain from more (see `one_thread`).
SUBPROCESS_ENV = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """The toy models are far too small to gain from threads; on a busy 2-core machine the
    threads' spin-waits make a generation 10x slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, toy_world: Path) -> dict:
    """Toy-dataset images at shapes whose generation sizes are known: 150x100 -> 96x64 at 64 px."""
    from utils.data import load_dataset_any

    rows = load_dataset_any(str(toy_world / "datasets" / "MultiGen-20M_train"), "train")
    folder = tmp_path_factory.mktemp("inputs")
    wide = folder / "wide.png"
    rows[0]["image"].convert("RGB").resize((150, 100)).save(wide)
    tall = folder / "tall.png"
    rows[1]["image"].convert("RGB").resize((100, 150)).save(tall)
    return {"wide": wide, "tall": tall, "captions": [rows[0]["text"], rows[1]["text"]]}


def annotator_output(toy_world: Path, task: str, image_path: Path, size: tuple[int, int]) -> np.ndarray:
    """The condition computed directly with the reward-model API, as uint8 (H, W, 3)."""
    from reward_models import build_reward_model

    manifest = json.loads((toy_world / "toy_world.json").read_text())
    key = {"canny": None, "segmentation": "segmentation_ade20k"}.get(task, task)
    path = str(toy_world / manifest["paths"]["reward_models"][key]) if key else None
    model = build_reward_model(task, path)
    image = Image.open(image_path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        condition = model.annotate(x)[0]  # as the original's demo: canny binary after hysteresis
    return (condition.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ---------------------------------------------------------------------------------------------
# Sizes and paths (no models)
# ---------------------------------------------------------------------------------------------


def test_generation_size_keeps_aspect_ratio_in_multiples_of_8():
    assert generation.generation_size(150, 100, 64) == (96, 64)
    assert generation.generation_size(100, 150, 64) == (64, 96)
    assert generation.generation_size(512, 512, 512) == (512, 512)
    width, height = generation.generation_size(640, 427, 512)  # a typical COCO photo
    assert (width % 8, height % 8) == (0, 0) and height == 512
    assert abs(width / height - 640 / 427) < 8 / 512
    with pytest.raises(InferenceError, match="--resolution"):
        generation.generation_size(64, 64, 4)


def test_controlnet_path_accepts_training_outputs_and_rejects_other_folders(toy_world: Path, tmp_path: Path):
    controlnet = toy_world / "toy-controlnet"
    assert paths.resolve_controlnet_path(str(controlnet), "hed") == str(controlnet)
    # train/reward_control.py: <output_dir>/checkpoint-<N>/controlnet/; the checkpoint folder itself is accepted.
    checkpoint = tmp_path / "run" / "checkpoint-500"
    shutil.copytree(controlnet, checkpoint / "controlnet")
    assert paths.resolve_controlnet_path(str(checkpoint), "hed") == str(checkpoint / "controlnet")
    assert paths.resolve_controlnet_path(str(checkpoint / "controlnet"), "hed") == str(checkpoint / "controlnet")
    shutil.copytree(controlnet, tmp_path / "run" / "checkpoint-1000" / "controlnet")
    with pytest.raises(InferenceError, match="checkpoint-1000"):  # unfinished run: points at the latest checkpoint
        paths.resolve_controlnet_path(str(tmp_path / "run"), "hed")

    with pytest.raises(InferenceError, match="UNet2DConditionModel"):
        paths.resolve_controlnet_path(str(toy_world / "toy-sd15" / "unet"), "hed")
    with pytest.raises(InferenceError, match="--sd_path"):
        paths.resolve_controlnet_path(str(toy_world / "toy-sd15"), "hed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match="no config.json"):
        paths.resolve_controlnet_path(str(tmp_path / "empty"), "hed")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(controlnet / "config.json", weightless)
    with pytest.raises(InferenceError, match="no weights"):
        paths.resolve_controlnet_path(str(weightless), "hed")
    with pytest.raises(InferenceError, match="no such folder"):
        paths.resolve_controlnet_path(str(tmp_path / "missing" / "controlnet"), "hed")
    # owner/name is a hub id, left to diffusers.
    hub_id = "lllyasviel/control_v11p_sd15_canny"
    assert paths.resolve_controlnet_path(hub_id, "canny") == hub_id


# ---------------------------------------------------------------------------------------------
# Single images, every task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", generation.TASKS)
def test_single_image_writes_images_condition_and_grid(task: str, toy_world: Path, inputs: dict, tmp_path: Path):
    out = tmp_path / "out"
    counts = generate.main(["--toy", str(toy_world), "--task", task, "--image", str(inputs["wide"]),
                            "--prompt", "a red circle", "--output_dir", str(out), *FAST])
    assert counts == {"generated": 1, "skipped": 0}
    images = [read(out / "images" / f"wide_{k}.png") for k in range(2)]
    assert all(image.shape == (64, 96, 3) for image in images)
    assert not np.array_equal(images[0], images[1])  # two samples, not one image twice
    condition = read(out / "conditions" / "wide.png")
    expected = annotator_output(toy_world, task, inputs["wide"], (96, 64))
    assert condition.shape == expected.shape == (64, 96, 3)
    assert np.abs(condition.astype(int) - expected.astype(int)).max() <= 1
    grid = read(out / "grids" / "wide.png")  # input | condition | 2 images
    assert grid.shape == (64, 4 * 96, 3)
    np.testing.assert_array_equal(grid[:, 96:192], condition)
    np.testing.assert_array_equal(grid[:, 192:288], images[0])
    record = json.loads((out / "rows" / "wide.json").read_text())
    assert record["prompt"] == "a red circle" and record["settings"]["task"] == task


def test_same_seed_same_images_and_resolution_flag(toy_world: Path, inputs: dict, tmp_path: Path):
    common_args = ["--toy", str(toy_world), "--task", "depth", "--image", str(inputs["tall"]), "--prompt", "a cat",
                   *FAST]
    generate.main([*common_args, "--output_dir", str(tmp_path / "a")])
    generate.main([*common_args, "--output_dir", str(tmp_path / "b")])
    np.testing.assert_array_equal(read(tmp_path / "a" / "images" / "tall_1.png"),
                                  read(tmp_path / "b" / "images" / "tall_1.png"))
    generate.main([*common_args, "--output_dir", str(tmp_path / "c"), "--resolution", "80"])
    assert read(tmp_path / "c" / "images" / "tall_0.png").shape == (120, 80, 3)


def test_canny_thresholds_change_the_condition(toy_world: Path, inputs: dict, tmp_path: Path):
    base = ["--toy", str(toy_world), "--task", "canny", "--image", str(inputs["wide"]), "--prompt", "x",
            "--steps", "1", "--num_images", "1"]
    generate.main([*base, "--output_dir", str(tmp_path / "low")])
    generate.main([*base, "--output_dir", str(tmp_path / "high"), "--canny_low_threshold", "0.6",
                   "--canny_high_threshold", "0.7"])
    low, high = read(tmp_path / "low" / "conditions" / "wide.png"), read(tmp_path / "high" / "conditions" / "wide.png")
    # A higher low threshold keeps a strict subset of the edge pixels.
    assert (high > 0).sum() < (low > 0).sum()
    assert not ((high > 0) & (low == 0)).any()


def test_ready_made_condition_through_the_real_script(toy_world: Path, inputs: dict, tmp_path: Path):
    """The script as users run it: a condition image, no --task, an explicit ControlNet folder."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "inference/generate.py", "--condition", str(inputs["wide"]), "--prompt", "a red circle",
         "--sd_path", str(toy_world / "toy-sd15"), "--controlnet_path", str(toy_world / "toy-controlnet"),
         "--resolution", "64", "--output_dir", str(out), *FAST],
        cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 rows generated" in result.stdout
    # The condition is the input resized to the generation size, fed as it is.
    expected = np.asarray(Image.open(inputs["wide"]).convert("RGB").resize((96, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(read(out / "conditions" / "wide.png"), expected)
    assert read(out / "grids" / "wide.png").shape == (64, 3 * 96, 3)  # condition | 2 images: no input image


# ---------------------------------------------------------------------------------------------
# Batch mode and resume
# ---------------------------------------------------------------------------------------------


def batch_files(out: Path) -> dict[str, int]:
    """Every output file (relative path) and its mtime in ns."""
    files = sorted(out.rglob("*.png")) + sorted((out / "rows").glob("*.json"))
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_batch_folder_resumes_and_regenerates_deleted_outputs(toy_world: Path, inputs: dict, tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(inputs["wide"], folder / "a.png")
    shutil.copy(inputs["tall"], folder / "b.png")
    (folder / "b.txt").write_text("a blue square\n")  # a caption file overrides --prompt for b only
    out = tmp_path / "out"
    argv = ["--toy", str(toy_world), "--task", "hed", "--input_dir", str(folder), "--prompt", "a red circle",
            "--output_dir", str(out), *FAST]

    assert generate.main(argv) == {"generated": 2, "skipped": 0}
    first = batch_files(out)
    assert len(first) == 2 * (2 + 1 + 1 + 1)  # per row: 2 images, condition, grid, record
    assert json.loads((out / "rows" / "b.json").read_text())["prompt"] == "a blue square"
    assert read(out / "images" / "b_0.png").shape == (96, 64, 3)
    np.testing.assert_allclose(read(out / "conditions" / "a.png"),
                               annotator_output(toy_world, "hed", folder / "a.png", (96, 64)), atol=1)

    # Run again: nothing is rewritten.
    assert generate.main(argv) == {"generated": 0, "skipped": 2}
    assert batch_files(out) == first

    # A deleted output makes its row (only) run again, with the same seed: the same bytes.
    deleted = out / "images" / "a_1.png"
    before = deleted.read_bytes()
    deleted.unlink()
    assert generate.main(argv) == {"generated": 1, "skipped": 1}
    assert deleted.read_bytes() == before
    after = batch_files(out)
    assert {k: v for k, v in after.items() if k.startswith(("images/b", "conditions/b", "grids/b", "rows/b"))} == \
           {k: v for k, v in first.items() if k.startswith(("images/b", "conditions/b", "grids/b", "rows/b"))}

    # A half-written record (killed run) or a changed setting is not "done".
    (out / "rows" / "b.json").write_text("{")
    assert generate.main(argv) == {"generated": 1, "skipped": 1}
    assert generate.main([*argv[:-4], "--steps", "1", "--num_images", "2"]) == {"generated": 2, "skipped": 0}


def test_batch_lists_csv_and_jsonl(toy_world: Path, inputs: dict, tmp_path: Path):
    shutil.copy(inputs["wide"], tmp_path / "wide.png")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"image": "wide.png", "prompt": "a red circle"}) + "\n\n"
        + json.dumps({"image": "wide.png", "text": "a green circle"}) + "\n"  # same image, another prompt
        + json.dumps({"condition": str(inputs["tall"]), "prompt": "an absolute path"}) + "\n")
    out = tmp_path / "jsonl"
    assert generate.main(["--toy", str(toy_world), "--task", "lineart", "--input_list", str(tmp_path / "rows.jsonl"),
                          "--output_dir", str(out), *FAST]) == {"generated": 3, "skipped": 0}
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["00000_wide.png", "00001_wide.png", "00002_tall.png"]
    assert json.loads((out / "rows" / "00001_wide.json").read_text())["prompt"] == "a green circle"
    np.testing.assert_array_equal(read(out / "conditions" / "00000_wide.png"),
                                  read(out / "conditions" / "00001_wide.png"))
    assert read(out / "conditions" / "00002_tall.png").shape == (96, 64, 3)

    (tmp_path / "rows.csv").write_text("image,prompt\nwide.png,\"a circle, red\"\n")
    out = tmp_path / "csv"
    generate.main(["--toy", str(toy_world), "--task", "lineart", "--input_list", str(tmp_path / "rows.csv"),
                   "--output_dir", str(out), *FAST])
    assert json.loads((out / "rows" / "00000_wide.json").read_text())["prompt"] == "a circle, red"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_clear_errors(toy_world: Path, inputs: dict, tmp_path: Path, monkeypatch):
    toy = ["--toy", str(toy_world), "--prompt", "x", "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(InferenceError, match="missing.png does not exist"):
        generate.main([*toy, "--task", "hed", "--image", str(tmp_path / "missing.png")])
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(InferenceError, match="cannot read .*broken.png"):
        generate.main([*toy, "--task", "hed", "--image", str(tmp_path / "broken.png")])
    with pytest.raises(InferenceError, match="not a ControlNetModel"):
        generate.main([*toy, "--task", "hed", "--image", str(inputs["wide"]),
                       "--controlnet_path", str(toy_world / "toy-sd15" / "unet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match="no config.json"):
        generate.main([*toy, "--task", "hed", "--image", str(inputs["wide"]),
                       "--controlnet_path", str(tmp_path / "empty")])
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "nowhere.png", "prompt": "x"}) + "\n")
    with pytest.raises(InferenceError, match="nowhere.png"):
        generate.main([*toy, "--task", "hed", "--input_list", str(tmp_path / "list.jsonl")])

    # A toy world without the task's annotator is an error, not a silent download of the paper's.
    manifest = json.loads((toy_world / "toy_world.json").read_text())
    manifest["paths"] = {"sd15": str(toy_world / "toy-sd15"), "controlnet": str(toy_world / "toy-controlnet"),
                         "reward_models": {}}
    (tmp_path / "old-toy").mkdir()
    (tmp_path / "old-toy" / "toy_world.json").write_text(json.dumps(manifest))
    with pytest.raises(InferenceError, match="has no depth annotator"):
        generate.main(["--toy", str(tmp_path / "old-toy"), "--task", "depth", "--image", str(inputs["wide"]),
                       "--prompt", "x", "--output_dir", str(tmp_path / "out")])

    # Annotator weights not available offline: the paper's HED file cannot be downloaded.
    def offline(url, dst, *args, **kwargs):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("CONTROLNETPP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InferenceError, match="hed annotator.*--reward_model_name_or_path"):
        generate.main(["--sd_path", str(toy_world / "toy-sd15"), "--controlnet_path", str(toy_world / "toy-controlnet"),
                       "--task", "hed", "--image", str(inputs["wide"]), "--prompt", "x", "--resolution", "64",
                       "--output_dir", str(tmp_path / "out"), *FAST])

    # Flag combinations are refused before anything loads.
    for argv in (["--task", "hed", "--prompt", "x"],  # no input
                 ["--task", "hed", "--image", "a.png", "--input_dir", "d", "--prompt", "x"],
                 ["--image", "a.png", "--prompt", "x"],  # no task to extract a condition
                 ["--task", "hed", "--image", "a.png"]):  # no prompt
        with pytest.raises(SystemExit):
            generate.parse_args(argv)


def test_offline_default_controlnet_error_from_the_script(toy_world: Path, inputs: dict, tmp_path: Path):
    """No --controlnet_path and no network: one sentence naming the flag, no traceback."""
    result = subprocess.run(
        [sys.executable, "inference/generate.py", "--task", "canny", "--image", str(inputs["wide"]), "--prompt", "x",
         "--sd_path", str(toy_world / "toy-sd15"), "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not fetch the released ControlNet++ canny")
    assert "--controlnet_path" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The model cache shared with the demo
# ---------------------------------------------------------------------------------------------


def test_model_cache_loads_each_controlnet_once_and_shares_sd(toy_world: Path, tmp_path: Path, monkeypatch):
    second = tmp_path / "second-controlnet"
    shutil.copytree(toy_world / "toy-controlnet", second)
    loads = []
    real_load = models.load_controlnet
    monkeypatch.setattr(models, "load_controlnet", lambda path, dtype: loads.append(path) or real_load(path, dtype))
    cache = models.ModelCache(str(toy_world / "toy-sd15"),
                              {"hed": str(toy_world / "toy-controlnet"), "depth": str(second)}, max_controlnets=1)
    hed, depth, hed_again = cache.pipeline("hed"), cache.pipeline("depth"), cache.pipeline("hed")
    assert hed.unet is depth.unet is hed_again.unet  # Stable Diffusion loaded once
    assert type(hed.scheduler).__name__ == "UniPCMultistepScheduler"
    assert loads == [str(toy_world / "toy-controlnet"), str(second), str(toy_world / "toy-controlnet")]  # LRU of 1
    cache.max_controlnets = 2
    cache.pipeline("depth"), cache.pipeline("hed"), cache.pipeline("depth")
    assert len(loads) == 4  # depth reloaded once, then both stay


def test_app_arguments_map_paths_to_tasks():
    args = app.parse_args(["--controlnet_path", "canny=/a", "/b", "--reward_model_name_or_path", "hed=/h.pth",
                           "--port", "7999"])
    assert args.controlnet_path == {"canny": "/a", "hed": "/b", "lineart": "/b", "depth": "/b", "segmentation": "/b"}
    assert args.reward_model_name_or_path == {"hed": "/h.pth"}
    assert (args.host, args.port) == ("127.0.0.1", 7999)  # local only unless asked
    with pytest.raises(SystemExit):
        app.parse_args(["--controlnet_path", "sketch=/a"])
    assert app.parse_args(["--toy"]).toy == app.DEFAULT_TOY_DIR
