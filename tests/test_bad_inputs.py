"""Bad inputs get a clear error naming the culprit (the flag, file, row or column), before any
model loads, and nothing from an untrusted file runs (docs/RELIABILITY.md).

Every case asserts the exact sentence a user sees. Training's and inference's flag checks run
through the scripts' own ``parse_args``; evaluation's row errors through ``eval.eval.read_row``
on a dataset built here; untrusted pickles through ``reward_models.base``.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from test_train_step import load_entry


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory) -> dict:
    """Folders that exist and look right enough for flag validation (no model is loaded)."""
    root = tmp_path_factory.mktemp("world")
    (root / "sd").mkdir()
    (root / "sd" / "model_index.json").write_text("{}")
    controlnet = root / "controlnet"
    controlnet.mkdir()
    (controlnet / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (controlnet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (root / "data").mkdir()
    return {"root": root, "sd": root / "sd", "controlnet": controlnet, "data": root / "data"}


def train_flags(world: dict, *extra: str) -> list[str]:
    return ["--task_name", "canny", "--pretrained_model_name_or_path", str(world["sd"]),
            "--controlnet_model_name_or_path", str(world["controlnet"]), "--dataset_name", str(world["data"]),
            "--output_dir", str(world["root"] / "out"), "--report_to", "none", *extra]


def training_error(world: dict, *extra: str) -> str:
    script = load_entry("reward_control")
    with pytest.raises(ValueError) as caught:
        script.parse_args(train_flags(world, *extra))
    return str(caught.value)


def test_the_fake_world_itself_passes(fake_world):
    args = load_entry("reward_control").parse_args(train_flags(fake_world))
    assert args.learning_rate == 5e-6


TRAINING_FLAGS = [  # (flags, the exact sentence, or its start)
    (["--grad_scale", "nan"], "--grad_scale must be a finite number, got nan."),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan."),
    (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0."),
    (["--lr_power", "inf"], "--lr_power must be a finite number, got inf."),
    (["--uncertainty_scale", "inf"], "--uncertainty_scale must be a finite number, got inf."),
    (["--resolution", "0"], "--resolution must be >= 8 and <= 2048, got 0 (a size in pixels)."),
    (["--resolution", "-64"], "--resolution must be >= 8 and <= 2048, got -64 (a size in pixels)."),
    (["--resolution", "100000"], "--resolution must be >= 8 and <= 2048, got 100000 (larger images do not fit"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--adam_beta2", "1.5"], "--adam_beta2 must be >= 0 and <= 1, got 1.5 (an exponential decay rate in [0, 1))."),
    (["--adam_beta1", "1"], "--adam_beta1 must be below 1 (1 never forgets the first gradient), got 1.0."),
    (["--adam_epsilon", "0"], "--adam_epsilon must be > 0, got 0.0 (it keeps Adam's division finite)."),
    (["--ema_decay", "1"], "--ema_decay must be below 1 (1 keeps the initial weights forever), got 1.0."),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0 (0 would delete every"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0, got -1.0 (0 turns clipping off)."),
    (["--lr_warmup_steps", "-5"], "--lr_warmup_steps must be >= 0, got -5."),
    (["--seed", "-3"], "--seed must be >= 0 and <= 9223372036854775807, got -3."),
]


@pytest.mark.parametrize("extra,message", TRAINING_FLAGS, ids=[" ".join(f) for f, _ in TRAINING_FLAGS])
def test_training_number_flags(fake_world, extra, message):
    assert training_error(fake_world, *extra).startswith(message)


def test_training_paths_that_look_local_are_never_looked_up_on_the_hub(fake_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work_dirs").mkdir()
    # `work_dirs/x` has the shape of a hub id; work_dirs/ exists here, so it is meant as a folder.
    message = training_error({**fake_world, "sd": "work_dirs/x"})
    assert message == (f"--pretrained_model_name_or_path work_dirs/x: no such folder (looked in {tmp_path}; it was "
                       "not looked up on the hub).")
    message = training_error({**fake_world, "data": "./missing-data"})
    assert message.startswith("--dataset_name ./missing-data: no such folder")
    message = training_error(fake_world, "--reward_model_name_or_path", str(tmp_path / "hed.pth"))
    assert message.startswith(f"--reward_model_name_or_path {tmp_path / 'hed.pth'}: no such file or folder")
    message = training_error(fake_world, "--validation_prompt", "x", "--validation_image", str(tmp_path / "v.png"))
    assert message.startswith(f"--validation_image {tmp_path / 'v.png'}: no such file")


def test_a_controlnet_folder_without_weights(fake_world, tmp_path):
    empty = tmp_path / "controlnet"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    message = training_error({**fake_world, "controlnet": empty})
    assert message == (f"--controlnet_model_name_or_path {empty} is not a diffusers ControlNet folder: it needs "
                       "config.json and diffusion_pytorch_model.safetensors; it has ['config.json'].")


def test_an_output_dir_that_is_a_file(fake_world, tmp_path):
    (tmp_path / "out").write_text("")
    message = training_error({**fake_world, "root": tmp_path})
    assert message == f"--output_dir {tmp_path / 'out'} is a file; pass a folder (it is created if missing)."


# ----------------------------------------------------------------------------------------------
# Datasets and rows
# ----------------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def eval_args(**overrides):
    import argparse

    values = dict(dataset_name="toy-set", dataset_split="validation", resolution=8, prompt_column="text",
                  image_column="image", condition_column=None, label_column=None)
    return argparse.Namespace(**{**values, **overrides})


def test_evaluation_row_errors_name_dataset_split_row_and_column():
    import datasets

    from eval.eval import read_row

    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}, {"bytes": good, "path": None}],
         "text": ["a", "b", "c"]}, features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    assert read_row(dataset, 0, eval_args())["prompt"] == "a"
    with pytest.raises(ValueError) as caught:
        read_row(dataset, 1, eval_args())
    assert str(caught.value).startswith("toy-set (split validation) row 1, column 'image': cannot decode it (")

    numbers = datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}], "text": [[3]]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "text": datasets.Sequence(datasets.Value("int64"))}))
    with pytest.raises(ValueError) as caught:
        read_row(numbers, 0, eval_args())
    assert str(caught.value) == ("toy-set (split validation) row 0, column 'text' (--prompt_column): expected a caption "
                                 "string or a list of them, got 3.")


def test_training_row_errors_name_dataset_split_row_and_column(toy_world):
    import datasets
    from transformers import CLIPTokenizer

    from utils.data import ControlNetRows

    tokenizer = CLIPTokenizer.from_pretrained(toy_world / "toy-sd15", subfolder="tokenizer")
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}], "text": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    rows = ControlNetRows(dataset, tokenizer, 8, "image", "text", dataset_name="toy-set (train)")
    with pytest.raises(ValueError, match=re.escape("toy-set (train): row 1 of column 'image': cannot read the image (")):
        rows[1]
    numbers = datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}], "text": [7]})
    rows = ControlNetRows(numbers, tokenizer, 8, "image", "text", dataset_name="toy-set (train)")
    with pytest.raises(ValueError, match=re.escape("toy-set (train): row 0 of column 'text': expected a string or a "
                                                   "list of strings, got int.")):
        rows.caption(0)


def test_an_empty_split_is_named(tmp_path):
    import datasets

    from utils.data import load_dataset_any

    folder = tmp_path / "data"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": []}),
                          "train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=re.escape(f"dataset {folder} (split validation) has no rows; pass a split")):
        load_dataset_any(str(folder), "validation")
    assert load_dataset_any(str(folder), "train")["text"] == ["a"]  # datasets alone cannot load it


def test_a_missing_relative_dataset_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from utils.data import load_dataset_any

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work_dirs").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape("dataset folder work_dirs/x does not exist (looked in")):
        load_dataset_any("work_dirs/x", "train")


# ----------------------------------------------------------------------------------------------
# Evaluation and inference flags
# ----------------------------------------------------------------------------------------------


def parser_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(argv)
    return capsys.readouterr().err.strip().splitlines()[-1]


def eval_argv(world: dict, *extra: str) -> list[str]:
    return ["--task_name", "canny", "--dataset_name", str(world["data"]), "--model_path", str(world["controlnet"]),
            "--sd_path", str(world["sd"]), "--output_dir", str(world["root"] / "eval-out"), *extra]


EVAL_FLAGS = [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan."),
    (["--guidance_scale", "-1"], "--guidance_scale must be >= 0, got -1.0."),
    (["--resolution", "100000"], "--resolution must be <= 2048, got 100000 (larger images do not fit"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0."),
    (["--vae_path", "./no-vae"], "--vae_path ./no-vae: no such folder"),
]


@pytest.mark.parametrize("extra,message", EVAL_FLAGS, ids=[" ".join(f) for f, _ in EVAL_FLAGS])
def test_evaluation_flags(fake_world, capsys, extra, message):
    from eval.eval import parse_args

    assert parse_args(eval_argv(fake_world)).guidance_scale == 7.5
    assert message in parser_error(parse_args, eval_argv(fake_world, *extra), capsys)


def test_evaluation_output_dir_that_is_a_file(fake_world, tmp_path, capsys):
    from eval.eval import parse_args

    (tmp_path / "file").write_text("")
    argv = eval_argv(fake_world)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "file")
    assert f"--output_dir {tmp_path / 'file'} is a file" in parser_error(parse_args, argv, capsys)


def generate_argv(world: dict, tmp_path: Path, *extra: str) -> list[str]:
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    return ["--task", "canny", "--prompt", "p", "--sd_path", str(world["sd"]), "--controlnet_path",
            str(world["controlnet"]), "--output_dir", str(tmp_path / "gen"), *extra]


GENERATE_FLAGS = [
    (["--resolution", "100000"], "--resolution must be <= 2048, got 100000 (larger images do not fit"),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan."),
    (["--controlnet_conditioning_scale", "inf"], "--controlnet_conditioning_scale must be a finite number, got inf."),
    (["--num_images", "1000"], "--num_images must be <= 64, got 1000 (images per row; run more rows instead)."),
]


@pytest.mark.parametrize("extra,message", GENERATE_FLAGS, ids=[" ".join(f) for f, _ in GENERATE_FLAGS])
def test_generate_flags(fake_world, tmp_path, capsys, extra, message):
    from inference.generate import parse_args

    argv = generate_argv(fake_world, tmp_path, "--image", str(tmp_path / "in.png"), *extra)
    assert message in parser_error(parse_args, argv, capsys)


def test_generate_inputs_are_named(fake_world, tmp_path, capsys):
    from inference.generation import InferenceError
    from inference.generate import main, parse_args

    with pytest.raises(InferenceError, match=re.escape(f"--image: {tmp_path} is a folder, not an image file (pass it "
                                                       "as --input_dir).")):
        main(parse_args(generate_argv(fake_world, tmp_path, "--image", str(tmp_path))))

    folder = tmp_path / "batch"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InferenceError, match=re.escape(f"--input_dir {folder}: caption a.txt is not UTF-8 text")):
        main(parse_args(generate_argv(fake_world, tmp_path, "--input_dir", str(folder))))

    listing = tmp_path / "rows.jsonl"
    listing.write_bytes(b'{"image": "a.png", "prompt": "caf\xe9"}\n')
    with pytest.raises(InferenceError, match=re.escape(f"--input_list {listing} is not UTF-8 text")):
        main(parse_args(generate_argv(fake_world, tmp_path, "--input_list", str(listing))))

    (tmp_path / "gen-file").write_text("")
    argv = generate_argv(fake_world, tmp_path, "--image", str(tmp_path / "in.png"))
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "gen-file")
    assert f"--output_dir {tmp_path / 'gen-file'} is a file" in parser_error(parse_args, argv, capsys)


def test_a_second_generate_on_a_busy_output_dir_refuses_naming_the_first(fake_world, tmp_path):
    from inference.generation import InferenceError
    from inference.generate import main, parse_args
    from test_reliability import hold_lock

    holder = hold_lock(tmp_path / "gen")
    try:
        with pytest.raises(InferenceError, match=rf"--output_dir {tmp_path / 'gen'} is in use by another run \(pid "
                                                 rf"{holder.pid} on "):
            main(parse_args(generate_argv(fake_world, tmp_path, "--image", str(tmp_path / "in.png"))))
    finally:
        holder.kill()
        holder.wait()


def test_a_failing_generate_rerun_leaves_the_finished_runs_config_alone(fake_world, toy_world, tmp_path):
    """The toy Stable Diffusion loads, the ControlNet (empty weights file) fails when the first row
    needs it, after the run's settings are known: the earlier run's generate_config.json stays."""
    from inference.generate import main, parse_args

    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generate_config.json").write_text('{"finished": true}\n')
    argv = generate_argv({**fake_world, "sd": toy_world / "toy-sd15"}, tmp_path, "--image", str(tmp_path / "in.png"),
                         "--device", "cpu", "--resolution", "64")
    with pytest.raises(Exception, match="controlnet"):
        main(parse_args(argv))
    assert (tmp_path / "gen" / "generate_config.json").read_text() == '{"finished": true}\n'
    assert (tmp_path / "gen" / ".run.lock").read_text() == ""  # released on the way out


def test_generate_sd_path_that_looks_local(fake_world, tmp_path, monkeypatch):
    from inference.generation import InferenceError
    from inference.paths import resolve_sd_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work_dirs").mkdir()
    with pytest.raises(InferenceError, match=re.escape("--sd_path work_dirs/sd15: no such folder.")):
        resolve_sd_path("work_dirs/sd15")
    assert resolve_sd_path("owner/model") == "owner/model"  # a hub id stays one


# ----------------------------------------------------------------------------------------------
# Images: one reader everywhere
# ----------------------------------------------------------------------------------------------


def test_16_bit_palette_cmyk_and_alpha_images_read_the_same_everywhere(tmp_path):
    from inference.generation import load_image, pil_to_tensor
    from utils.data import to_rgb
    from utils.images import read_image

    depth = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # up to 63000: PIL's convert saturates it
    Image.fromarray(depth).save(tmp_path / "depth16.png")
    expected = np.round(depth.astype(np.float64) * 255 / depth.max() - 1e-9).astype(np.uint8)
    with Image.open(tmp_path / "depth16.png") as raw:
        assert raw.mode.startswith("I")
        assert (np.asarray(raw.convert("RGB"))[..., 0] == 255).mean() > 0.9  # the defect
    for image in (read_image(tmp_path / "depth16.png"), load_image(tmp_path / "depth16.png"),
                  to_rgb(Image.open(tmp_path / "depth16.png"))):
        array = np.asarray(image)
        assert image.mode == "RGB" and np.abs(array[..., 0].astype(int) - expected).max() <= 1
    assert np.allclose(pil_to_tensor(Image.open(tmp_path / "depth16.png"))[0, 0].numpy() * 255,
                       np.asarray(read_image(tmp_path / "depth16.png"))[..., 0], atol=0.51)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(read_image(palette)).tolist() == [[[10, 20, 30], [200, 100, 0]]]
    rgba = Image.fromarray(np.array([[[1, 2, 3, 0]]], np.uint8), mode="RGBA")
    assert np.asarray(read_image(rgba)).tolist() == [[[1, 2, 3]]]  # the colour as stored, alpha dropped
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(read_image(cmyk)).tolist() == [[[255, 0, 0]]]
    assert read_image(tmp_path / "depth16.png", mode="L").mode == "L"


def test_unreadable_images_are_named(tmp_path):
    from utils.images import ImageReadError, read_image

    with pytest.raises(ImageReadError, match=re.escape(f"--image: {tmp_path} is a folder, not an image file.")):
        read_image(tmp_path, what="--image")
    (tmp_path / "cut.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8))[:60])
    with pytest.raises(ImageReadError, match=re.escape("cut.png: cannot read it as an image (")):
        read_image(tmp_path / "cut.png", what="cut.png")


# ----------------------------------------------------------------------------------------------
# Untrusted files
# ----------------------------------------------------------------------------------------------

# GLOBAL collections.Counter, then BUILD with slot state {"most_common": "pwned"}: setattr on the
# class, which would replace Counter.most_common for the rest of the process.
PATCH_COUNTER = (b"\x80\x02ccollections\nCounter\nN}X\x0b\x00\x00\x00most_commonX\x05\x00\x00\x00pwneds\x86b.")


def test_the_restricted_unpickler_refuses_to_patch_classes():
    import collections

    from reward_models.base import _RestrictedUnpickler, _trusted_globals

    _RestrictedUnpickler.trusted = _trusted_globals()
    assert "collections.Counter" in _RestrictedUnpickler.trusted or "collections.OrderedDict" in \
        _RestrictedUnpickler.trusted
    payload = PATCH_COUNTER if "collections.Counter" in _RestrictedUnpickler.trusted else \
        PATCH_COUNTER.replace(b"Counter", b"OrderedDict")
    before = vars(collections.Counter).get("most_common")
    with pytest.raises(pickle.UnpicklingError, match="refused: the file sets attributes of (Counter|OrderedDict), an "
                                                     "object it did not create"):
        _RestrictedUnpickler(io.BytesIO(payload)).load()
    assert vars(collections.Counter).get("most_common") is before
    # The same opcodes on an untrusted (inert) object, or on an object the file built, stay allowed.
    inert = b"\x80\x02cnot_a_module\nThing\n)\x81N}X\x01\x00\x00\x00aK\x01s\x86b."
    _RestrictedUnpickler(io.BytesIO(inert)).load()
    state = pickle.dumps(collections.OrderedDict(a=1), protocol=2)
    assert _RestrictedUnpickler(io.BytesIO(state)).load() == collections.OrderedDict(a=1)


def test_a_plain_state_dict_file_with_extra_objects_is_refused_without_fallback(tmp_path):
    """HED / line drawing files are plain state dicts: what weights_only refuses is not read at all."""
    import collections

    import torch

    from reward_models.base import load_state_dict_file

    path = tmp_path / "ControlNetHED.pth"
    torch.save({"w": torch.zeros(1), "extra": collections.Counter(a=1).most_common}, path)  # a bound method
    with pytest.raises(RuntimeError, match=re.escape(f"The HED checkpoint at {path} holds objects other than tensors, "
                                                     "which torch.load(weights_only=True) refused")):
        load_state_dict_file(path, "HED checkpoint")


def test_segmentation_without_mmcv_ops_says_how_to_build_it(toy_world, monkeypatch):
    """A machine set up with --without-segmentation: loading a segmenter names the command that builds mmcv."""
    import sys

    from reward_models.segmentation import SegmentationRewardModel

    monkeypatch.setitem(sys.modules, "mmcv.ops", None)  # `import mmcv.ops` raises ImportError
    with pytest.raises(ImportError, match=r"bash scripts/setup.sh.*builds mmcv"):
        SegmentationRewardModel.from_pretrained(str(toy_world / "reward_models" / "ade20k_seg"))
