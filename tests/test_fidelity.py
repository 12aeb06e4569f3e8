"""The paper's protocol by default (docs/FIDELITY.md): the original release's command lines, its
training inputs, schedules and EMA, checked against independent computations.

- the eight command lines of the original's train/*.sh run unchanged (flags as it passes them,
  hub ids replaced by toy paths, sizes shrunk for a CPU) and train a step, meaning what they meant;
- a training batch of a non-square image equals what the original's torchvision transforms give
  (composed here as its scripts compose them);
- the canny ControlNet input in training is kornia 0.7's unclamped thresholded magnitude; at
  evaluation and inference, kornia's binary edges after hysteresis;
- the EMA follows diffusers' EMAModel (which the original used) update for update;
- the launchers pass the original's *effective* warmups.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from test_train_e2e import fresh_accelerate_state  # noqa: F401  (fixture)
from test_train_step import load_entry, needs_mmseg

# ------------------------------------------------------------------------------------------
# The original release's command lines
# ------------------------------------------------------------------------------------------
# Each as its train/<name>.sh passes it (``--flag=value``), with the hub ids replaced by toy paths.
# Only the sizes are shrunk for a CPU (resolution, batch, accumulation, steps, workers, fp16).
_COMMON = ["--resolution=512", "--train_batch_size=8", "--gradient_accumulation_steps=4", "--learning_rate=1e-5",
           '--mixed_precision=fp16', "--gradient_checkpointing", "--lr_scheduler=constant_with_warmup",
           "--checkpointing_steps=500", "--validation_steps=100"]
_REWARD = ["--use_ema", "--timestep_sampling_start=0", "--timestep_sampling_end=1000", "--min_timestep_rewarding=0",
           "--max_timestep_rewarding=200"]
ORIGINAL_COMMAND_LINES = {  # name -> (script, dataset, flags)
    "reward_canny": ("reward_control", "MultiGen-20M_train", [
        "--reward_model_name_or_path=canny", "--task_name=canny", "--caption_column=text",
        "--conditioning_image_column=canny", "--dataloader_num_workers=8", "--max_train_steps=10000",
        "--lr_warmup_steps=0", "--grad_scale=1.0", *_REWARD]),
    "reward_hed": ("reward_control", "MultiGen-20M_train", [
        "--reward_model_name_or_path={world}/reward_models/ControlNetHED.pth", "--task_name=hed",
        "--caption_column=text", "--conditioning_image_column=hed", "--dataloader_num_workers=8",
        "--max_train_steps=10000", "--lr_warmup_steps=10", "--grad_scale=1", *_REWARD]),
    "reward_linedrawing": ("reward_control", "MultiGen-20M_train", [
        "--reward_model_name_or_path={world}/reward_models/lineart/model.pth", "--task_name=lineart",
        "--caption_column=text", "--conditioning_image_column=lineart", "--dataloader_num_workers=8",
        "--max_train_steps=10000", "--lr_warmup_steps=10", "--grad_scale=0.5", *_REWARD]),
    "reward_depth": ("reward_control", "MultiGen-20M_depth", [
        "--reward_model_name_or_path={world}/reward_models/dpt-hybrid-midas", "--task_name=depth",
        "--caption_column=text", "--conditioning_image_column=control_depth", "--dataloader_num_workers=8",
        "--max_train_steps=10000", "--lr_warmup_steps=10", "--grad_scale=1.0", *_REWARD]),
    "reward_ade20k": ("reward_control", "Captioned_ADE20K", [
        "--reward_model_name_or_path={world}/reward_models/ade20k_seg", "--task_name=segmentation",
        "--caption_column=prompt", "--conditioning_image_column=control_seg", "--cache_dir=data/huggingface_datasets",
        "--dataloader_num_workers=16", "--max_train_steps=5000", "--lr_warmup_steps=200", "--grad_scale=0.5",
        *_REWARD]),
    "reward_cocostuff": ("reward_control", "Captioned_COCOStuff", [
        "--reward_model_name_or_path={world}/reward_models/cocostuff_seg", "--task_name=segmentation",
        "--caption_column=prompt", "--conditioning_image_column=control_seg", "--label_column=panoptic_seg_map",
        "--cache_dir=data/huggingface_datasets", "--dataloader_num_workers=8", "--max_train_steps=5000",
        "--lr_warmup_steps=10", "--grad_scale=0.2", *_REWARD]),
    "finetune_ade20k": ("train_controlnet", "Captioned_ADE20K", [
        "--caption_column=prompt", "--conditioning_image_column=control_seg", "--cache_dir=data/huggingface_datasets",
        "--dataloader_num_workers=32", "--max_train_steps=5000", "--lr_warmup_steps=200"]),
    "finetune_cocostuff": ("train_controlnet", "Captioned_COCOStuff", [
        "--caption_column=prompt", "--conditioning_image_column=control_seg", "--cache_dir=data/huggingface_datasets",
        "--dataloader_num_workers=32", "--max_train_steps=5000", "--lr_warmup_steps=200"]),
}
CPU_SIZES = ["--resolution=64", "--train_batch_size=2", "--gradient_accumulation_steps=1", "--max_train_steps=1",
             "--mixed_precision=no", "--dataloader_num_workers=0", "--report_to=none"]


def original_command_line(world: Path, name: str, output_dir: Path) -> list[str]:
    _, dataset, flags = ORIGINAL_COMMAND_LINES[name]
    return [f"--pretrained_model_name_or_path={world / 'toy-sd15'}",
            f"--controlnet_model_name_or_path={world / 'toy-controlnet'}", f"--output_dir={output_dir}",
            f"--dataset_name={world / 'datasets' / dataset}", *_COMMON,
            *[flag.format(world=world) for flag in flags], *CPU_SIZES]


@pytest.mark.parametrize("name", list(ORIGINAL_COMMAND_LINES))
def test_original_command_line_parses_and_trains_a_step(toy_world, tmp_path, fresh_accelerate_state, name):  # noqa: F811
    needs_mmseg("ade20k" if "ade20k" in name or "cocostuff" in name else name)
    script_name = ORIGINAL_COMMAND_LINES[name][0]
    script = load_entry(script_name)
    out = tmp_path / name
    args = script.parse_args(original_command_line(toy_world, name, out))
    reward = script_name == "reward_control"
    # What the original's spellings mean here.
    assert args.resize_mode == ("squash" if reward else "center_crop")
    assert args.resize_interpolation == ("bicubic" if reward else "bilinear")
    if name in ("reward_canny", "reward_hed", "reward_linedrawing"):
        assert args.conditioning_image_column is None  # the sentinel: computed from the image on the fly
    script.main(args)

    config = json.loads((out / "training_config.json").read_text())
    if name == "reward_ade20k":  # no --label_column: the labels come from the palette condition
        assert config["label_column"] == "control_seg"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1] and np.isfinite(log[0]["loss"])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "controlnet_ema").is_dir() == reward  # the original's fine-tunes ran without --use_ema


def test_original_extra_flags_are_accepted_and_mean_something(toy_world, tmp_path):
    from train.validation import validation_pipeline_kwargs

    script = load_entry("reward_control")
    base = original_command_line(toy_world, "reward_canny", tmp_path / "out")
    args = script.parse_args(base + ["--guidance_scale=3.0", "--controlnet_conditioning_scale=0.5",
                                     "--control_guidance_start=0.1", "--control_guidance_end=0.9", "--hub_token=x",
                                     "--hub_model_id=me/model", "--non_ema_revision=main", "--max_val_samples=2",
                                     "--keep_in_memory", "True"])
    assert args.keep_in_memory is True and args.num_validation_rows == 2
    assert validation_pipeline_kwargs(args) == {"guidance_scale": 3.0, "controlnet_conditioning_scale": 0.5,
                                                "control_guidance_start": 0.1, "control_guidance_end": 0.9}
    # The original's type=bool read "False" as True; here it means False.
    assert script.parse_args(base + ["--keep_in_memory", "False"]).keep_in_memory is False
    assert validation_pipeline_kwargs(script.parse_args(base)) == {}  # the pipeline's defaults, as the original
    with pytest.raises(ValueError, match="--conditioning_image_column hed computes the hed condition"):
        script.parse_args(base + ["--conditioning_image_column=hed"])
    stage_one = load_entry("train_controlnet").parse_args(
        original_command_line(toy_world, "finetune_ade20k", tmp_path / "ft")
        + ["--proportion_empty_prompts=0.1", "--min_train_timesteps=10", "--max_train_timesteps=900"])
    assert (stage_one.text_condition_dropout, stage_one.timestep_sampling_start,
            stage_one.timestep_sampling_end) == (0.1, 10, 900)
    # The original's stage one read the value as a column name (only its reward stage had the sentinel).
    canny_stage_one = load_entry("train_controlnet").parse_args(
        [a for a in original_command_line(toy_world, "finetune_ade20k", tmp_path / "ft")
         if not a.startswith("--conditioning_image_column")] + ["--conditioning_image_column=canny"])
    assert canny_stage_one.condition_detector is None and canny_stage_one.conditioning_image_column == "canny"


def test_dataset_config_name_reaches_load_dataset_and_is_refused_for_a_local_folder(toy_world, monkeypatch):
    import datasets

    from utils.data import load_dataset_any

    seen = {}

    def fake_load_dataset(name, config_name=None, **kwargs):
        seen.update(name=name, config_name=config_name)
        return datasets.Dataset.from_dict({"text": ["a row"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_dataset_any("someone/dataset", "train", config_name="subset")
    assert seen == {"name": "someone/dataset", "config_name": "subset"}
    with pytest.raises(ValueError, match="--dataset_config_name subset is for hub datasets"):
        load_dataset_any(str(toy_world / "datasets" / "MultiGen-20M_train"), "train", config_name="subset")


def test_wrong_ids_file_leaves_rows_out_and_refuses_pickles(tmp_path):
    from utils.data import rows_to_keep

    (tmp_path / "wrong.json").write_text("[1, 3]")
    assert rows_to_keep(str(tmp_path / "wrong.json"), 5) == [0, 2, 4]
    with pytest.raises(ValueError, match="pickles can run code"):
        rows_to_keep(str(tmp_path / "wrong.pkl"), 5)


def test_the_original_accelerate_config_is_where_its_command_lines_look():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "train" / "config.yml"))
    assert (str(config.distributed_type), config.num_processes, str(config.mixed_precision)) == (
        "DistributedType.MULTI_GPU", 8, "fp16")


# ------------------------------------------------------------------------------------------
# The training batch against the original's torchvision transforms
# ------------------------------------------------------------------------------------------
def _non_square_rows(tmp_path: Path):
    """One row: a 96 x 64 (w x h) photo-like image, its condition and a COCO-Stuff-style label."""
    import datasets

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:96]
    image = np.stack([(xx * 2.6) % 256, (yy * 3.9) % 256, ((xx + yy) * 1.3) % 256], -1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    image[20:40, 30:70] = (250, 20, 20)
    image[8:56, 4:28], image[20:44, 10:22] = 0, 255  # a hard edge: white on black
    condition = np.clip(255 - image.astype(int), 0, 255).astype(np.uint8)
    label = ((xx // 16) + 4 * (yy // 16)).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "control": datasets.Image(),
                                  "label": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(image)], "control": [Image.fromarray(condition)],
                                       "label": [Image.fromarray(label)], "text": ["a thing"]}, features=features)


def test_reward_stage_batch_equals_the_original_squash(toy_world, tmp_path):
    """reward_control.py: Resize((R, R), bicubic, antialias) + ToTensor (+ Normalize([0.5], [0.5])) on the
    image and the condition, labels through torch.tensor + Resize((R, R), nearest); its crop is a no-op."""
    from torchvision import transforms
    from transformers import CLIPTokenizer

    from reward_models.segmentation import label_image_to_index
    from utils.data import ControlNetRows

    resolution = 48
    dataset = _non_square_rows(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(toy_world / "toy-sd15" / "tokenizer"))
    rows = ControlNetRows(dataset, tokenizer, resolution, "image", "text", conditioning_image_column="control",
                          label_column="label", label_from_image=lambda im: label_image_to_index(im, "index"))
    ours = rows[0]
    size = (resolution, resolution)
    image_transforms = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC,
                                                             antialias=True),
                                           transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    condition_transforms = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC,
                                                                 antialias=True), transforms.ToTensor()])
    label_transforms = transforms.Resize(size, interpolation=transforms.InterpolationMode.NEAREST, antialias=True)
    row = dataset[0]
    assert torch.equal(ours["pixel_values"], image_transforms(row["image"].convert("RGB")))
    assert torch.equal(ours["conditioning_pixel_values"], condition_transforms(row["control"].convert("RGB")))
    label = label_transforms(torch.tensor(np.asarray(row["label"]), dtype=torch.long).unsqueeze(0))
    assert torch.equal(ours["labels"], label.squeeze(0))


def test_ade20k_labels_the_original_way_on_request(toy_world, tmp_path):
    """--palette_labels resize_then_map: the palette condition squashed (bicubic) like the condition, then
    each pixel's nearest of the 151 colours (on the 0..255 scale), minus one, background 255."""
    import datasets
    from torchvision import transforms
    from transformers import CLIPTokenizer

    from reward_models.palettes import ADE20K_PALETTE_WITH_BACKGROUND, ade20k_resized_palette_to_label
    from reward_models.segmentation import label_image_to_index
    from utils.data import ControlNetRows

    palette = np.asarray(ADE20K_PALETTE_WITH_BACKGROUND, dtype=np.uint8)
    classes = np.random.default_rng(3).integers(0, 151, (5, 7))
    control = Image.fromarray(palette[classes.repeat(12, 0).repeat(14, 1)])  # 84 x 98, sharp class borders
    dataset = datasets.Dataset.from_dict(
        {"image": [control], "control": [control], "text": ["x"]},
        features=datasets.Features({"image": datasets.Image(), "control": datasets.Image(), "text": datasets.Value("string")}))
    tokenizer = CLIPTokenizer.from_pretrained(str(toy_world / "toy-sd15" / "tokenizer"))
    common = dict(conditioning_image_column="control", label_column="control",
                  label_from_image=lambda im: label_image_to_index(im, "ade20k_palette"))
    original = ControlNetRows(dataset, tokenizer, 40, "image", "text", **common,
                              label_from_resized=ade20k_resized_palette_to_label)[0]["labels"]
    default = ControlNetRows(dataset, tokenizer, 40, "image", "text", **common)[0]["labels"]
    resized = transforms.Compose([transforms.Resize((40, 40), interpolation=transforms.InterpolationMode.BICUBIC,
                                                    antialias=True), transforms.ToTensor()])(control)
    # The original's float32 arithmetic: colours x 255, Euclidean distance to each palette colour, first minimum.
    colours = resized.permute(1, 2, 0).numpy() * np.float32(255)
    difference = colours[:, :, None, :] - palette[None, None].astype(np.float32)
    nearest = np.sqrt((difference * difference).sum(-1, dtype=np.float32)).argmin(-1) - 1
    expected = np.where(nearest < 0, 255, nearest)
    assert (original.numpy() == expected).mean() > 0.995  # numpy's float32 sum order may flip a near-tie
    full_size = torch.from_numpy(np.where(classes == 0, 255, classes - 1).repeat(12, 0).repeat(14, 1))
    exact = transforms.Resize((40, 40), interpolation=transforms.InterpolationMode.NEAREST)(full_size[None])[0].numpy()
    np.testing.assert_array_equal(default.numpy(), exact)  # the default: classes mapped first, resized nearest
    assert (original.numpy() != exact).any()  # blended border colours: other classes, the original's defect


def test_stage_one_batch_equals_the_original_centre_crop(toy_world, tmp_path):
    """train_controlnet.py: Resize(R, bilinear) (shorter side) + CenterCrop(R) + ToTensor (+ Normalize)."""
    from torchvision import transforms
    from transformers import CLIPTokenizer

    from utils.data import ControlNetRows

    resolution = 48
    dataset = _non_square_rows(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(toy_world / "toy-sd15" / "tokenizer"))
    rows = ControlNetRows(dataset, tokenizer, resolution, "image", "text", conditioning_image_column="control",
                          resize_mode="center_crop", resize_interpolation="bilinear")
    ours = rows[0]
    crop = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution), transforms.ToTensor()]
    row = dataset[0]
    assert torch.equal(ours["pixel_values"], transforms.Compose([*crop, transforms.Normalize([0.5], [0.5])])(
        row["image"].convert("RGB")))
    assert torch.equal(ours["conditioning_pixel_values"], transforms.Compose(crop)(row["control"].convert("RGB")))
    # The aspect-keeping random crop stays available: same size, a window of the shorter-side resize.
    random_rows = ControlNetRows(dataset, tokenizer, resolution, "image", "text", resize_mode="random_crop")
    assert random_rows[0]["pixel_values"].shape == (3, resolution, resolution)


def test_canny_training_input_is_the_original_unclamped_magnitude(toy_world, tmp_path):
    """The ControlNet input of canny in training: kornia 0.7's NMS magnitude above 0.1 (no hysteresis),
    not clamped, computed from the denormalised batch (x * 0.5 + 0.5) as the original did."""
    import kornia
    from transformers import CLIPTokenizer

    from reward_models import build_reward_model
    from utils.data import ControlNetRows, collate_rows
    from train.reward_control import controlnet_condition

    assert kornia.__version__ == "0.7.0"  # the original's pin (its NMS tie rule)
    tokenizer = CLIPTokenizer.from_pretrained(str(toy_world / "toy-sd15" / "tokenizer"))
    batch = collate_rows([ControlNetRows(_non_square_rows(tmp_path), tokenizer, 64, "image", "text")[0]])
    condition = controlnet_condition(batch, build_reward_model("canny"))
    magnitude, _ = kornia.filters.canny(batch["pixel_values"] * 0.5 + 0.5, 0.1, 0.2, hysteresis=False)
    expected = torch.nn.functional.threshold(magnitude, 0.1, 0.0).expand(-1, 3, -1, -1)
    assert torch.equal(condition, expected)
    assert condition.max() > 1.5  # a hard edge: the original fed values above 1


def test_canny_evaluation_and_inference_edges_are_kornia_hysteresis():
    import kornia

    from inference.generation import pil_to_tensor, tensor_to_pil
    from inference.models import extract_condition
    from reward_models import build_reward_model

    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:24, 8:24] = 1.0  # a pixel-aligned square: kornia 0.7/0.8 drop both pixels of a tie
    image[..., 12:14, 2:6] = 0.15  # a weak blob: only kept when connected to a strong edge
    expected = kornia.filters.canny(image, 0.1, 0.2)[1]
    annotated = build_reward_model("canny").annotate(image)
    assert torch.equal(annotated, expected.expand(-1, 3, -1, -1)) and set(annotated.unique().tolist()) <= {0.0, 1.0}
    # The original's kornia: 0.7 / 0.8 drop both pixels of a tie across an edge, 0.9 keeps one. Whether
    # two magnitudes tie depends on the machine's float kernels (a 16 px square gave 26 edge pixels on
    # one machine, 28 on another, 24 in float64), so the pin itself is what is checked.
    assert kornia.__version__ == "0.7.0"
    canny = build_reward_model("canny")
    assert torch.equal(canny.annotate(image, low_threshold=0.1, high_threshold=0.2), annotated)
    other = kornia.filters.canny(image, 0.3, 0.5)[1]
    assert torch.equal(canny.annotate(image, low_threshold=0.3, high_threshold=0.5), other.expand(-1, 3, -1, -1))
    # The demo's sliders and generate.py's flags reach annotate through inference's extract_condition.
    picture = tensor_to_pil(image)
    strict = pil_to_tensor(extract_condition(canny, picture, (0.3, 0.5)))
    assert torch.equal(strict, canny.annotate(pil_to_tensor(picture), low_threshold=0.3, high_threshold=0.5))
    assert not torch.equal(strict, pil_to_tensor(extract_condition(canny, picture)))


# ------------------------------------------------------------------------------------------
# EMA and warmup
# ------------------------------------------------------------------------------------------
def test_ema_follows_diffusers_ema_model_update_for_update():
    from diffusers.training_utils import EMAModel

    from utils.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ours = ModelEMA(model, decay=0.9999)
    reference = EMAModel(model.parameters(), decay=0.9999)
    for _ in range(5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ours.update(model)
        reference.step(model.parameters())
        for (name, _), shadow in zip(model.named_parameters(), reference.shadow_params):
            torch.testing.assert_close(ours.shadow[name], shadow, rtol=0, atol=1e-6)
    # The first update copies the weights (decay 0): after one step the EMA equals the model.
    single = ModelEMA(model)
    single.update(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(single.shadow[name], parameter)


EFFECTIVE_WARMUP = {"reward_canny": 0, "reward_hed": 5, "reward_linedrawing": 5, "reward_depth": 5,
                    "reward_cocostuff": 5, "reward_ade20k": 100, "finetune_ade20k": 100, "finetune_cocostuff": 100}


@pytest.mark.parametrize("name", sorted(EFFECTIVE_WARMUP))
def test_launchers_pass_the_originals_effective_warmup(tmp_path, name):
    """The original's flag F, times its accumulation (4), over the 8 processes that each stepped the
    scheduler: F * 4 / 8 optimizer steps."""
    from diffusers.optimization import get_scheduler

    def steps_to_full_lr(num_warmup_steps: int, processes: int = 8) -> int:
        """Optimizer steps until the lr reaches its value, accelerate stepping the scheduler once per process."""
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=num_warmup_steps)
        steps = 0
        while scheduler.get_last_lr()[0] < 1.0:
            for _ in range(processes):
                scheduler.step()
            steps += 1
        return steps

    original_flag = int(next(f for f in ORIGINAL_COMMAND_LINES[name][2] if f.startswith("--lr_warmup_steps="))
                        .split("=")[1])
    # The original: flag x accumulation (4) scheduler steps; ours (train/reward_control.py): flag x processes.
    assert steps_to_full_lr(original_flag * 4) == EFFECTIVE_WARMUP[name]
    assert steps_to_full_lr(EFFECTIVE_WARMUP[name] * 8) == EFFECTIVE_WARMUP[name]
    fake = tmp_path / "bin"
    fake.mkdir()
    python = fake / "python"  # stands in for the interpreter the launcher runs: records its arguments
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    python.chmod(0o755)
    (fake / "accelerate").write_text("#!/usr/bin/env bash\nexit 1\n")
    (fake / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "NUM_PROCESSES": "1", "CUDA_VISIBLE_DEVICES": "",
           "RECORD": str(tmp_path / "argv.txt")}
    env.pop("ACCELERATE_CONFIG", None)
    result = subprocess.run(["bash", f"train/{name}.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[argv.index("--lr_warmup_steps") + 1] == str(EFFECTIVE_WARMUP[name])
    assert argv[argv.index("--lr_scheduler") + 1] == "constant_with_warmup"


@pytest.mark.slow
def test_original_launch_line_with_its_accelerate_config(toy_world, tmp_path):
    """`accelerate launch --config_file "train/config.yml" --main_process_port=... train/reward_control.py`
    from the repository root, as the original's reward_canny.sh: 8 processes (gloo on a CPU), one step."""
    from conftest import run_entry

    flags = [f for f in original_command_line(toy_world, "reward_canny", tmp_path / "out")
             if not f.startswith(("--train_batch_size", "--report_to"))]
    result = run_entry(["accelerate", "launch", "--config_file", "train/config.yml", "--main_process_port=23156",
                        "train/reward_control.py", *flags, "--train_batch_size=1", "--report_to=none"],
                       env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert "1 per process x 8 processes" in result.stdout + result.stderr
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1] and np.isfinite(log[0]["loss"])


def test_resuming_a_checkpoint_made_with_other_data_settings_is_refused(tmp_path):
    from types import SimpleNamespace

    from utils.checkpoints import check_resumed_data_settings

    checkpoint = tmp_path / "checkpoint-500"
    checkpoint.mkdir()
    (checkpoint / "training_config.json").write_text(json.dumps({"max_train_steps": 10000}))  # before the change
    args = SimpleNamespace(resize_mode="squash", resize_interpolation="bicubic", palette_labels="map_then_resize")
    with pytest.raises(ValueError, match=r"--resize_mode random_crop there, squash now\). Pass --resize_mode "
                                         r"random_crop to continue it as it was"):
        check_resumed_data_settings(args, checkpoint)
    args.resize_mode = "random_crop"
    check_resumed_data_settings(args, checkpoint)  # the same settings: continues
