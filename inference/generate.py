"""Generate images with Stable Diffusion 1.5 + a (ControlNet++) ControlNet from the command line.

One image (the condition is extracted from it by the task's annotator):

    python inference/generate.py --task canny --image cat.png --prompt "a cat" \
        --controlnet_path work_dirs/reward_canny --output_dir outputs/cat

A ready-made condition image (no annotator):

    python inference/generate.py --task hed --condition cat_hed.png --prompt "a cat"

A folder of images (one prompt for all, or a `<stem>.txt` caption next to each image), or a
CSV / JSONL list with columns `image` (or `condition`) and `prompt`:

    python inference/generate.py --task depth --input_list rows.jsonl --output_dir outputs/depth

The toy world (tiny random models, CPU, seconds; written if missing):

    python inference/generate.py --toy work_dirs/toy --task hed --image x.png --prompt "a red circle"

Outputs, per row `<name>` (the image's file stem; `<row>_<stem>` for lists):

    <output_dir>/images/<name>_<k>.png     the generated images, k = 0 .. num_images - 1
    <output_dir>/conditions/<name>.png     the condition fed to the ControlNet
    <output_dir>/grids/<name>.png          input image | condition | generated images
    <output_dir>/rows/<name>.json          written last: the row's prompt, source and settings

Files are written atomically and a row counts as done when its record matches the current
prompt, input file and settings and all its files exist. A killed run started again skips done
rows and regenerates the rest; changing a setting regenerates every row (`--overwrite`
regenerates regardless). Every row uses the same `--seed`, so a row's images do not depend on
which other rows ran before it (the paper's evaluation uses seed 42 for every prompt).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass

from PIL import Image

from inference.generation import (
    DEFAULT_CANNY_HIGH_THRESHOLD,
    DEFAULT_CANNY_LOW_THRESHOLD,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_RESOLUTION,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DTYPES,
    TASKS,
    TOY_RESOLUTION,
    HelpFormatter,
    InferenceError,
    choose_device_and_dtype,
    generate_images,
    generation_size,
    load_image,
    resize_image,
)
from inference.models import ModelCache, extract_condition
from inference.paths import DEFAULT_SD_PATH, resolve_controlnet_path, toy_model_paths
from reward_models import reward_class
from utils.io import hstack_images, save_image, save_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def parse_args(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate images with SD1.5 + a ControlNet(++) from images, conditions or lists of them.",
        formatter_class=HelpFormatter,
    )
    source = parser.add_argument_group("input (exactly one)")
    source.add_argument("--image", help="an image; the condition is extracted from it by the --task annotator")
    source.add_argument("--condition", help="a ready-made condition image, fed to the ControlNet as it is")
    source.add_argument("--input_dir", help="a folder of images (batch); prompt from <stem>.txt or --prompt")
    source.add_argument("--input_list", help="a .csv or .jsonl file of rows with `image` (or `condition`) and `prompt`"
                                             " columns (batch); relative paths are relative to the file's folder")

    parser.add_argument("--task", choices=TASKS,
                        help="the condition type; picks the annotator and the default ControlNet")
    parser.add_argument("--prompt", help="the text prompt (batch: for images without a <stem>.txt caption)")
    parser.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="the paper's evaluation value")
    parser.add_argument("--output_dir", default="outputs/generate", help="where images, conditions and grids go")
    parser.add_argument("--overwrite", action="store_true", help="regenerate rows that are already done")

    models = parser.add_argument_group("models")
    models.add_argument("--toy", metavar="DIR",
                        help="use a toy world's models (written there first if missing) for every path not given")
    models.add_argument("--sd_path", default=None,
                        help=f"Stable Diffusion 1.5 folder or hub id (default: {DEFAULT_SD_PATH})")
    models.add_argument("--controlnet_path", default=None,
                        help="ControlNet folder or hub id: a diffusers ControlNet, the output of "
                             "train/reward_control.py or one of its checkpoint-<N> folders (their EMA weights: "
                             "the controlnet_ema/ inside); default: the released ControlNet++ of --task")
    models.add_argument("--reward_model_name_or_path", default=None,
                        help="the annotator's weights for --task (default: the paper's, downloaded once)")
    models.add_argument("--reward_model_checkpoint", default=None,
                        help="segmentation only: the checkpoint of an mmseg config given as "
                             "--reward_model_name_or_path (a folder with config.py and model.pth needs none)")
    models.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    models.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")

    sampling = parser.add_argument_group("sampling (defaults: the paper's evaluation protocol)")
    sampling.add_argument("--num_images", type=int, default=4, help="images per row")
    sampling.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="UniPC steps")
    sampling.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                          help="classifier-free guidance scale")
    sampling.add_argument("--controlnet_conditioning_scale", type=float, default=1.0,
                          help="weight of the ControlNet's residuals (0 = plain Stable Diffusion)")
    sampling.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the same for every row")
    sampling.add_argument("--resolution", type=int, default=None,
                          help=f"shorter side in pixels, aspect ratio kept, multiples of 8 "
                               f"(default: {DEFAULT_RESOLUTION}; {TOY_RESOLUTION} with --toy)")
    sampling.add_argument("--canny_low_threshold", type=float, default=DEFAULT_CANNY_LOW_THRESHOLD,
                          help="canny only: hysteresis low threshold (kornia's gradient-magnitude scale; the "
                               "original demo's 0.1): weaker pixels are never edges")
    sampling.add_argument("--canny_high_threshold", type=float, default=DEFAULT_CANNY_HIGH_THRESHOLD,
                          help="canny only: hysteresis high threshold (the original demo's 0.2): stronger pixels are "
                               "edges, pixels between the thresholds only when connected to one")

    args = parser.parse_args(args)

    sources = [name for name in ("image", "condition", "input_dir", "input_list") if getattr(args, name)]
    if len(sources) != 1:
        parser.error("give exactly one input: --image, --condition, --input_dir or --input_list"
                     + (f" (got {', '.join('--' + s for s in sources)})." if sources else "."))
    args.batch = sources[0] in ("input_dir", "input_list")
    if args.task is None and args.condition is None and args.input_list is None:
        parser.error("--task is required to extract a condition from --image / --input_dir.")
    if args.task is None and args.controlnet_path is None and args.toy is None:
        parser.error("without --task, pass --controlnet_path (the default ControlNet++ weights are per task).")
    if sources[0] in ("image", "condition") and not args.prompt:
        parser.error(f"--prompt is required with --{sources[0]}.")
    if args.input_list and not args.input_list.lower().endswith((".csv", ".jsonl")):
        parser.error(f"--input_list {args.input_list} must be a .csv or .jsonl file.")
    for name in ("num_images", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.resolution is not None and args.resolution < 8:
        parser.error(f"--resolution must be at least 8 pixels, got {args.resolution}.")
    if not 0 < args.canny_low_threshold <= args.canny_high_threshold < 1:
        parser.error(f"--canny_low_threshold ({args.canny_low_threshold}) and --canny_high_threshold "
                     f"({args.canny_high_threshold}) must satisfy 0 < low <= high < 1.")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}.")
    try:
        check_sampling_numbers(args)
        from utils.flags import check_writable_dir

        check_writable_dir("--output_dir", args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_sampling_numbers(args) -> None:
    """Finite numbers and bounded work (a typo like --resolution 100000 ran unbounded)."""
    from utils.flags import MAX_RESOLUTION, reject_nonfinite, require

    reject_nonfinite(args)
    require(args, "resolution", high=MAX_RESOLUTION, why="larger images do not fit in any GPU's memory")
    require(args, "guidance_scale", low=0)
    require(args, "num_images", high=64, why="images per row; run more rows instead")
    require(args, "steps", high=1000, why="the scheduler has 1000 training timesteps")


@dataclass
class Row:
    """One unit of work: a prompt and either an image (condition extracted) or a condition."""

    name: str
    prompt: str
    image: Path | None = None
    condition: Path | None = None
    where: str = ""  # names the row in error messages: the flag, or the list file and row number

    @property
    def source(self) -> Path:
        return self.image if self.image is not None else self.condition


def read_rows(args) -> list[Row]:
    """The rows to generate, in order, with unique names (they name the output files)."""
    if args.image or args.condition:
        source = Path(args.image or args.condition)
        return [Row(source.stem, args.prompt, image=Path(args.image) if args.image else None,
                    condition=Path(args.condition) if args.condition else None,
                    where="--image" if args.image else "--condition")]
    if args.input_dir:
        return rows_from_folder(Path(args.input_dir), args.prompt)
    return rows_from_list(Path(args.input_list), args.prompt)


def rows_from_folder(folder: Path, prompt: str | None) -> list[Row]:
    if not folder.is_dir():
        raise InferenceError(f"--input_dir {folder} is not a folder.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InferenceError(f"--input_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    rows, seen = [], {}
    for path in images:
        if path.stem in seen:
            raise InferenceError(
                f"--input_dir {folder}: {seen[path.stem].name} and {path.name} would write the same outputs; "
                "rename one of them.")
        seen[path.stem] = path
        caption = path.with_suffix(".txt")
        try:
            row_prompt = caption.read_text(encoding="utf-8").strip() if caption.is_file() else prompt
        except UnicodeDecodeError as error:
            raise InferenceError(f"--input_dir {folder}: caption {caption.name} is not UTF-8 text ({error}); "
                                 "save it as UTF-8.") from error
        if not row_prompt:
            raise InferenceError(f"no prompt for {path}: add {caption.name} next to it or pass --prompt.")
        rows.append(Row(path.stem, row_prompt, image=path, where=f"--input_dir {folder}"))
    return rows


def rows_from_list(list_file: Path, default_prompt: str | None) -> list[Row]:
    """CSV (header row) or JSONL rows with `image` or `condition`, and `prompt` (or `text`)."""
    if not list_file.is_file():
        raise InferenceError(f"--input_list {list_file} does not exist.")
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InferenceError(f"--input_list {list_file} is not UTF-8 text ({error}); save it as UTF-8.") from error
    if list_file.suffix.lower() == ".csv":
        records = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InferenceError(f"--input_list {list_file} line {number} is not JSON: {error}.") from error
    if not records:
        raise InferenceError(f"--input_list {list_file} has no rows.")
    rows = []
    for index, record in enumerate(records):
        where = f"--input_list {list_file} row {index + 1}"
        image, condition = record.get("image") or None, record.get("condition") or None
        if (image is None) == (condition is None):
            raise InferenceError(f"{where} needs exactly one of the columns `image` and `condition`.")
        prompt = record.get("prompt") or record.get("text") or default_prompt
        if not prompt:
            raise InferenceError(f"{where} has no `prompt` (or `text`) and no --prompt was given.")
        source = list_file.parent / (image or condition)  # an absolute path stays absolute
        # The row number keeps names unique when one image appears with several prompts.
        rows.append(Row(f"{index:05d}_{source.stem}", str(prompt), image=source if image else None,
                        condition=source if condition else None, where=where))
    return rows


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images side by side in one row (all resized to the first one's height)."""
    height = images[0].height
    return hstack_images([im if im.height == height else im.resize((round(im.width * height / im.height), height))
                          for im in images])


def output_paths(output_dir: Path, name: str, num_images: int) -> dict:
    return {
        "images": [output_dir / "images" / f"{name}_{k}.png" for k in range(num_images)],
        "condition": output_dir / "conditions" / f"{name}.png",
        "grid": output_dir / "grids" / f"{name}.png",
        "record": output_dir / "rows" / f"{name}.json",
    }


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row_record(row: Row, settings: dict) -> dict:
    """What a row's outputs depend on; a stored record equal to it means the row is done."""
    return {
        "prompt": row.prompt,
        "source": str(row.source.resolve()),
        "source_kind": "image" if row.image is not None else "condition",
        "source_sha256": file_digest(row.source),
        "settings": settings,
    }


def row_is_done(paths: dict, record: dict) -> bool:
    try:
        stored = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return False
    files = [*paths["images"], paths["condition"], paths["grid"]]
    return stored == record and all(p.is_file() for p in files)


def generate_row(row: Row, models: ModelCache, args, task: str | None) -> tuple[list, Image.Image, list]:
    """([the resized input image] or [], the condition, the generated images), all at the generation size."""
    if row.image is not None:
        image = load_image(row.image, row.where)
        image = resize_image(image, generation_size(*image.size, args.resolution))
        condition = extract_condition(models.annotator(task), image,
                                      (args.canny_low_threshold, args.canny_high_threshold))
    else:
        image = None
        condition = load_image(row.condition, row.where)
        # Segmentation palettes must keep their exact colours: nearest, never interpolated.
        condition = resize_image(condition, generation_size(*condition.size, args.resolution),
                                 nearest=task is not None and reward_class(task).condition_is_palette)
    images = generate_images(
        models.pipeline(task), condition, row.prompt, negative_prompt=args.negative_prompt,
        num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale, seed=args.seed)
    return [image] if image is not None else [], condition, images


def resolve_model_paths(args) -> None:
    """Fill the model paths from --toy and the defaults (in place)."""
    if args.toy:
        annotated = [args.task] if args.task is not None and args.reward_model_name_or_path is None else []
        sd_path, controlnet_path, annotators = toy_model_paths(args.toy, annotated)
        args.sd_path = args.sd_path or sd_path
        args.controlnet_path = args.controlnet_path or controlnet_path
        if annotated:
            args.reward_model_name_or_path = annotators[args.task]
        args.resolution = args.resolution or TOY_RESOLUTION
    args.sd_path = args.sd_path or DEFAULT_SD_PATH
    args.resolution = args.resolution or DEFAULT_RESOLUTION


def main(args=None) -> dict:
    """Run the generator; returns counts {"generated": n, "skipped": m} for callers and tests."""
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    resolve_model_paths(args)
    device, dtype = choose_device_and_dtype(args.device, args.dtype)
    rows = read_rows(args)
    for row in rows:  # all inputs checked before minutes of model loading
        if row.source.is_dir():
            raise InferenceError(f"{row.where}: {row.source} is a folder, not an image file"
                                 + (" (pass it as --input_dir)." if row.where == "--image" else "."))
        if not row.source.is_file():
            raise InferenceError(f"{row.where}: {row.source} does not exist.")
    if any(row.image is not None for row in rows) and args.task is None:
        raise InferenceError("rows with an `image` need --task to extract their condition.")
    output_dir = Path(args.output_dir)
    from utils.run_lock import OutputDirBusy, RunLock

    try:
        lock = RunLock(output_dir).acquire()  # one writer per folder: a second run refuses, naming the first
    except OutputDirBusy as error:
        raise InferenceError(str(error)) from None
    try:
        return generate_rows(args, rows, output_dir, device, dtype)
    finally:
        lock.release()


def generate_rows(args, rows: list[Row], output_dir: Path, device, dtype) -> dict:
    """Generate every row not already done in ``output_dir``; counts {"generated", "skipped"}."""
    task = args.task
    controlnet_path = resolve_controlnet_path(args.controlnet_path, task)  # fails fast, before SD loads
    models = ModelCache(args.sd_path, {task: controlnet_path}, {task: args.reward_model_name_or_path},
                        device=device, dtype=dtype, annotator_checkpoint=args.reward_model_checkpoint)
    settings = {
        "task": task,
        "sd_path": models.sd_path,
        "controlnet_path": models.controlnet_path(task),
        "reward_model_name_or_path": args.reward_model_name_or_path,
        "reward_model_checkpoint": args.reward_model_checkpoint,
        "negative_prompt": args.negative_prompt,
        "num_images": args.num_images,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
        "seed": args.seed,
        "resolution": args.resolution,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if task is not None and reward_class(task).annotation_thresholds is not None:  # canny
        settings["canny_low_threshold"] = args.canny_low_threshold
        settings["canny_high_threshold"] = args.canny_high_threshold

    counts = {"generated": 0, "skipped": 0}
    for number, row in enumerate(rows, start=1):
        paths = output_paths(output_dir, row.name, args.num_images)
        record = row_record(row, settings)
        if not args.overwrite and row_is_done(paths, record):
            counts["skipped"] += 1
            print(f"[{number}/{len(rows)}] {row.name}: already done, skipped")
            continue
        start = time.perf_counter()
        inputs, condition, images = generate_row(row, models, args, task)
        if counts["generated"] == 0:  # once models loaded and a row worked: a failing re-run leaves it alone
            save_json({**settings, "device": str(device)}, output_dir / "generate_config.json")
        save_image(condition, paths["condition"])
        for image, path in zip(images, paths["images"]):
            save_image(image, path)
        save_image(make_grid(inputs + [condition] + images), paths["grid"])
        save_json(record, paths["record"])  # last: the row is done only once everything is on disk
        counts["generated"] += 1
        print(f"[{number}/{len(rows)}] {row.name}: {len(images)} images {images[0].width}x{images[0].height} "
              f"in {time.perf_counter() - start:.1f} s")
    print(f"done: {counts['generated']} rows generated, {counts['skipped']} already done, in {output_dir}")
    return counts


if __name__ == "__main__":
    try:
        main()
    except InferenceError as error:
        sys.exit(f"error: {error}")
