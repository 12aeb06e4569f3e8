"""Training data (utils/data.py) and flag validation (parse_args of both training scripts)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from test_train_step import load_entry, toy_flags

RESOLUTION = 32


@pytest.fixture(scope="module")
def tokenizer(toy_world):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(toy_world / "toy-sd15", subfolder="tokenizer")


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _gradient_image(width: int, height: int) -> Image.Image:
    """A smooth colour image with no two equal columns, so a shifted crop would be noticed."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def make_dataset(captions, images=None, labels=None):
    """A datasets.Dataset with image / text / control (= the image) / label columns."""
    import datasets

    base = _gradient_image(48, 40)
    images = images or [
        base,  # RGB, wider than tall: the random crop moves horizontally
        base.convert("L"),  # grayscale
        base.convert("RGBA"),  # with alpha
        base.convert("P"),  # palette
        base.resize((12, 10)),  # smaller than the resolution: upscaled
    ]
    columns = {
        "image": [_png(im) for im in images],
        "text": captions[: len(images)],
        "control": [_png(im) for im in images],
        "label": [_png(Image.fromarray(np.full((im.height, im.width), 7, dtype=np.uint8))) for im in images]
        if labels is None else labels,
    }
    features = datasets.Features({
        "image": datasets.Image(), "control": datasets.Image(), "label": datasets.Image(),
        "text": datasets.Sequence(datasets.Value("string")) if isinstance(captions[0], list) else datasets.Value("string"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def rows_of(dataset, tokenizer, **kwargs):
    from utils.data import ControlNetRows

    # The aspect-keeping random crop (--resize_mode random_crop); the original's squash and centre
    # crop are checked against its torchvision transforms in test_fidelity.py.
    options = dict(conditioning_image_column="control", label_column="label",
                   label_from_image=lambda im: np.asarray(im.convert("L"), dtype=np.int64), seed=0,
                   resize_mode="random_crop")
    options.update(kwargs)
    return ControlNetRows(dataset, tokenizer, RESOLUTION, "image", "text", **options)


def test_any_image_mode_and_size_gives_aligned_tensors(tokenizer):
    rows = rows_of(make_dataset(["a"] * 5), tokenizer)
    for index in range(5):
        row = rows[index]
        assert row["pixel_values"].shape == (3, RESOLUTION, RESOLUTION)
        assert row["conditioning_pixel_values"].shape == (3, RESOLUTION, RESOLUTION)
        assert row["labels"].shape == (RESOLUTION, RESOLUTION) and row["labels"].dtype == torch.int64
        assert set(row["labels"].unique().tolist()) == {7}
        assert -1.0 <= row["pixel_values"].min() and row["pixel_values"].max() <= 1.0
        assert 0.0 <= row["conditioning_pixel_values"].min() and row["conditioning_pixel_values"].max() <= 1.0
        # The condition column holds the same picture: the same resize and the same crop must
        # give back the target image (a crop drawn independently would be off by columns).
        torch.testing.assert_close((row["pixel_values"] + 1) / 2, row["conditioning_pixel_values"],
                                   atol=1e-6, rtol=0)
        assert row["index"] == index and row["input_ids"].shape == (77,)
    # Grayscale / palette / RGBA rows hold the same picture as the RGB row (up to the conversions);
    # compared with centre crops (the random crop differs per row).
    rows = rows_of(make_dataset(["a"] * 5), tokenizer, train=False)
    rgb, gray = rows[0]["pixel_values"], rows[1]["pixel_values"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # grey in 3 channels
    torch.testing.assert_close(rows[2]["pixel_values"], rgb)  # alpha dropped, colours kept


def test_crops_are_random_per_epoch_and_deterministic_given_the_seed(tokenizer):
    dataset = make_dataset(["a"] * 5)
    first, again = rows_of(dataset, tokenizer), rows_of(dataset, tokenizer)
    crops = []
    for epoch in range(6):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        torch.testing.assert_close(first[0]["pixel_values"], again[0]["pixel_values"], atol=0, rtol=0)
        crops.append(first[0]["pixel_values"][0, 0, 0].item())  # top-left value moves with the crop
    assert len(set(crops)) > 1, "the random crop never moved"
    center = rows_of(dataset, tokenizer, train=False)[0]["pixel_values"]
    center_again = rows_of(dataset, tokenizer, train=False, seed=123)[0]["pixel_values"]
    torch.testing.assert_close(center, center_again, atol=0, rtol=0)  # eval: centre crop, no randomness


def test_list_captions_random_in_training_first_in_eval(tokenizer):
    captions = [["first caption", "second caption", "third caption"]] * 5
    dataset = make_dataset(captions)
    train_rows = rows_of(dataset, tokenizer)
    eval_rows = rows_of(dataset, tokenizer, train=False)
    ids = {name: tokenizer(name, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
           for name in captions[0]}
    seen = set()
    for epoch in range(12):
        train_rows.set_epoch(epoch)
        row_ids = train_rows[0]["input_ids"]
        seen |= {name for name, expected in ids.items() if torch.equal(row_ids, expected)}
    assert len(seen) >= 2 and seen <= set(captions[0])
    assert torch.equal(eval_rows[0]["input_ids"], ids["first caption"])
    assert eval_rows.caption(0) == "first caption"


def test_condition_dropouts(tokenizer):
    dataset = make_dataset(["a red circle"] * 5)
    empty = tokenizer("", max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
    image_only = rows_of(dataset, tokenizer, image_condition_dropout=1.0)[0]
    assert image_only["drop_condition"] and not torch.equal(image_only["input_ids"], empty)
    text_only = rows_of(dataset, tokenizer, text_condition_dropout=1.0)[0]
    assert not text_only["drop_condition"] and torch.equal(text_only["input_ids"], empty)
    both = rows_of(dataset, tokenizer, all_condition_dropout=1.0)[0]
    assert both["drop_condition"] and torch.equal(both["input_ids"], empty)
    none = rows_of(dataset, tokenizer)[0]
    assert not none["drop_condition"] and not torch.equal(none["input_ids"], empty)


def test_collate_gives_the_documented_batch(tokenizer):
    from utils.data import collate_rows

    rows = rows_of(make_dataset(["a"] * 5), tokenizer)
    batch = collate_rows([rows[i] for i in (4, 2, 0)])  # a short batch of 3
    assert batch["pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION) and batch["pixel_values"].dtype == torch.float32
    assert batch["conditioning_pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION)
    assert batch["labels"].shape == (3, RESOLUTION, RESOLUTION) and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == (3, 77) and batch["index"].tolist() == [4, 2, 0]
    assert batch["drop_condition"].dtype == torch.bool


def test_corrupt_image_names_its_column_and_row(tokenizer):
    import datasets

    dataset = make_dataset(["a"] * 5)
    truncated = _png(_gradient_image(48, 40))["bytes"][:100]
    dataset = datasets.Dataset.from_dict(
        {**dataset.to_dict(), "control": [dataset.to_dict()["control"][0], {"bytes": truncated, "path": None},
                                          *dataset.to_dict()["control"][2:]]},
        features=dataset.features,
    )
    rows = rows_of(dataset, tokenizer)
    rows[0]  # the other rows are fine
    with pytest.raises(ValueError, match=r"row 1 of column 'control': cannot read the image"):
        rows[1]


def test_missing_column_lists_the_available_ones(tokenizer):
    from utils.data import ControlNetRows

    with pytest.raises(ValueError, match=r"--caption_column 'prompt' is not a column of dataset .*"
                                         r"\['image', 'text', 'control', 'label'\]"):
        ControlNetRows(make_dataset(["a"] * 5), tokenizer, RESOLUTION, "image", "prompt")


def test_missing_column_is_reported_when_the_training_dataset_loads(toy_world, tmp_path):
    from train import reward_control

    args = load_entry("reward_control").parse_args(
        toy_flags(toy_world, "depth", tmp_path, "--conditioning_image_column", "control_seg"))
    with pytest.raises(ValueError, match=r"--conditioning_image_column 'control_seg' is not a column of dataset "
                                         r".*MultiGen-20M_depth \(split train\); its columns are \["):
        reward_control.load_train_dataset(args)


# ----------------------------------------------------------------------------------------------
# parse_args
# ----------------------------------------------------------------------------------------------

BAD_REWARD_FLAGS = [
    (["--resolution", "65"], r"--resolution 65 is not divisible by 8"),
    (["--max_timestep_rewarding", "1000"], r"reward window .* inside the sampling range"),
    (["--min_timestep_rewarding", "300", "--max_timestep_rewarding", "200"], r"reward window .* must be ordered"),
    (["--timestep_sampling_start", "300"], r"reward window .* inside the sampling range"),
    (["--validation_prompt", "a cat"], r"Pass --validation_prompt and --validation_image together"),
    (["--use_8bit_adam"], r"--use_8bit_adam needs bitsandbytes"),
    (["--diffusion_loss_weight", "0", "--grad_scale", "0"], r"leave nothing to train"),
    (["--image_condition_dropout", "0.7", "--text_condition_dropout", "0.7"], r"add up to 1.4 > 1"),
    (["--conditioning_image_column", "image"], r"computes its condition from the image .* drop --conditioning_image_column"),
    (["--resume_from_checkpoint", "checkpoint-7"], r"--resume_from_checkpoint checkpoint-7 is not a folder"),
]


@pytest.mark.parametrize("extra,message", BAD_REWARD_FLAGS, ids=[m[:30] for _, m in BAD_REWARD_FLAGS])
def test_reward_parse_args_rejects_bad_combinations(toy_world, tmp_path, extra, message):
    if extra == ["--use_8bit_adam"]:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            pytest.skip("bitsandbytes is installed here, --use_8bit_adam is valid")
    with pytest.raises(ValueError, match=message):
        load_entry("reward_control").parse_args(toy_flags(toy_world, "canny", tmp_path, *extra))


def test_tasks_with_dataset_conditions_or_labels_require_their_columns(toy_world, tmp_path):
    parse_args = load_entry("reward_control").parse_args
    depth = toy_flags(toy_world, "depth", tmp_path)
    without_condition = [f for i, f in enumerate(depth) if f != "--conditioning_image_column"
                         and depth[i - 1] != "--conditioning_image_column"]
    with pytest.raises(ValueError, match=r"--task_name depth reads its condition from the dataset: pass "
                                         r"--conditioning_image_column"):
        parse_args(without_condition)
    seg = toy_flags(toy_world, "ade20k", tmp_path)
    without_label = [f for i, f in enumerate(seg) if f != "--label_column" and seg[i - 1] != "--label_column"]
    # ADE20K palettes without --label_column (the original's reward_ade20k.sh): the condition column
    # is the label once the reward model says its labels are palettes; class-index labels need the column.
    args = parse_args(without_label)
    assert args.label_column is None
    from types import SimpleNamespace

    from train.reward_control import resolve_label_column

    resolve_label_column(args, SimpleNamespace(label_format="ade20k_palette"))
    assert args.label_column == "control_seg"
    args.label_column = None
    with pytest.raises(ValueError, match=r"not ADE20K palette images: pass --label_column \(panoptic_seg_map"):
        resolve_label_column(args, SimpleNamespace(label_format="index"))
    with pytest.raises(ValueError, match=r"--label_format index compares against class-index maps: pass --label_column"):
        parse_args(without_label + ["--label_format", "index"])


def test_parse_args_keeps_the_original_flags_and_defaults(toy_world, tmp_path):
    args = load_entry("reward_control").parse_args(toy_flags(
        toy_world, "canny", tmp_path, "--grad_scale", "0.5", "--lr_scheduler", "constant_with_warmup",
        "--use_ema", "--gradient_checkpointing", "--mixed_precision", "no", "--checkpoints_total_limit", "2"))
    assert (args.grad_scale, args.min_timestep_rewarding, args.max_timestep_rewarding) == (0.5, 0, 200)
    assert (args.timestep_sampling_start, args.timestep_sampling_end) == (0, 1000)
    assert args.seed == 0 and args.use_ema and args.diffusion_loss_weight == 1.0
    assert args.dataset_split == "train" and args.num_validation_inference_steps == 20


def test_plain_finetuning_needs_a_condition_column_and_no_reward(toy_world, tmp_path):
    parse_args = load_entry("train_controlnet").parse_args
    common = ["--pretrained_model_name_or_path", str(toy_world / "toy-sd15"), "--dataset_name",
              str(toy_world / "datasets" / "Captioned_ADE20K"), "--caption_column", "prompt"]
    with pytest.raises(ValueError, match=r"plain fine-tuning needs a condition: pass --conditioning_image_column "
                                         r"\(e.g. control_seg\) or --condition_detector"):
        parse_args(common)
    args = parse_args(common + ["--conditioning_image_column", "control_seg"])
    assert not hasattr(args, "grad_scale")
    with pytest.raises(ValueError, match="pass --conditioning_image_column or --condition_detector, not both"):
        parse_args(common + ["--conditioning_image_column", "control_seg", "--condition_detector", "canny"])
    with pytest.raises(ValueError, match="--condition_detector_path needs --condition_detector"):
        parse_args(common + ["--conditioning_image_column", "control_seg", "--condition_detector_path", "x.pth"])
    assert parse_args(common + ["--condition_detector", "hed"]).condition_detector == "hed"
    with pytest.raises(SystemExit):  # reward flags do not exist here
        parse_args(common + ["--conditioning_image_column", "control_seg", "--grad_scale", "1"])
