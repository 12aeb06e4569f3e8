"""Generate the evaluation images of ControlNet++ (paper Sec. 4.1, "Evaluation").

For every row of an evaluation split: build the condition (canny / hed / lineart: the task's
annotator applied to the real image; depth: control_depth; segmentation: control_seg),
generate --num_groups images for the prompt with SD1.5 + ControlNet (UniPC, 20 steps, CFG 7.5,
negative prompt "worst quality, low quality", 512 px, seed 42), extract the condition back
from each generation with the same annotator, and store everything as PNG. The metric scripts
(eval/eval_{edge,depth,seg,fid,clip}.py) then read the folder; its layout is in eval/common.py.

    python eval/eval.py --task_name canny --dataset_name limingcv/MultiGen-20M_canny_eval \
        --dataset_split validation --prompt_column text --model_path lllyasviel/control_v11p_sd15_canny \
        --output_dir work_dirs/eval/canny/controlnet
    accelerate launch --multi_gpu --num_processes 8 eval/eval.py ...     # 8 GPUs, rows shared

Reproducible and resumable:
- each image has its own generator, seeded from (--seed, row, group), so an image does not
  depend on the number of processes, on the batch size or on which rows were done before;
- rows are batched in fixed chunks of the row list, so a run restarted with the same
  --batch_size rebuilds exactly the batches of the first run (other batch sizes give the same
  images up to floating-point rounding: the noise is the same, the matrix kernels may differ);
- files are written atomically (a temporary name, then a rename): a run killed at any moment
  and started again with the same flags generates only the rows that are not complete.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from eval.common import (CONFIG_NAME, annotation_path, condition_path, full_float32, generated_path, reused,
                         reward_model, row_files, visualization_path)
from reward_models import REWARD_MODELS, TASK_ALIASES, reward_class
from reward_models.segmentation import LABEL_FORMAT_BY_COLUMN
from utils.data import load_dataset_any
from utils.images import to_mode
from utils.io import save_image, save_json

MODELS = ("controlnet", "t2i-adapter", "controlnet-sdxl", "oracle")
# --model oracle: no generation; every "generated" image is the row's real image, brought to the
# generation resolution and back as generations are. Scored like any model, it gives the metric's
# ceiling on this dataset (the "oracle" row of CPO's table): what a perfect generator would get.
ORACLE = "oracle"
# Settings that change the generated files: a folder generated with other values cannot be
# completed by this run (checked against eval_config.json).
# What the stored conditions and annotations are: "original" = as the original release's eval.py
# wrote them (canny: binary edges after hysteresis; hed / lineart maps truncated to uint8; depth
# label min-max normalised at full size, truncated, resized nearest). A folder written by an
# earlier version of this code (no such entry) is refused rather than completed with other files.
CONDITION_PROTOCOL = "original"
GENERATION_SETTINGS = (
    "condition_protocol", "task_name", "dataset_name", "dataset_split", "image_column", "condition_column", "prompt_column",
    "label_column", "label_format", "model", "model_path", "sd_path", "vae_path", "guidance_scale",
    "num_inference_steps", "num_groups", "resolution", "seed", "negative_prompt", "mixed_precision",
    "reward_model_name_or_path", "reward_model_checkpoint", "ddim",
)


def parse_args(args=None):
    parser = argparse.ArgumentParser(description="Generate ControlNet++ evaluation images (paper protocol by default).")
    parser.add_argument("--task_name", required=True, help=f"one of {tuple(REWARD_MODELS)} ('seg' = segmentation)")
    parser.add_argument("--dataset_name", required=True, help="hub id or a local save_to_disk folder")
    parser.add_argument("--dataset_split", default="validation")
    parser.add_argument("--cache_dir", default=None, help="datasets cache folder for hub ids")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--condition_column", default=None,
                        help="depth: control_depth, segmentation: control_seg (defaults); canny / hed / lineart "
                             "compute the condition from --image_column and ignore this flag")
    parser.add_argument("--prompt_column", default=None, help="default: 'text' if the dataset has it, else 'prompt'")
    parser.add_argument("--label_column", default=None,
                        help="what the metric compares with: depth: control_depth (default); segmentation: "
                             "seg_map (ADE20K) or panoptic_seg_map (COCO-Stuff), required")
    parser.add_argument("--label_format", default=None, choices=("ade20k_palette", "index", "index_reduce_zero"),
                        help="segmentation: how --label_column is written; default from its name "
                             f"({LABEL_FORMAT_BY_COLUMN})")
    parser.add_argument("--model", default="controlnet", choices=MODELS)
    parser.add_argument("--model_path", default=None,
                        help="the ControlNet (or T2I-Adapter) to evaluate; not used with --model oracle")
    parser.add_argument("--sd_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--vae_path", default=None,
                        help="replace the pipeline's VAE (the original used madebyollin/sdxl-vae-fp16-fix for SDXL)")
    parser.add_argument("--reward_model_name_or_path", default=None,
                        help="the task's annotator (condition extractor); default: the paper's reward model")
    parser.add_argument("--reward_model_checkpoint", default=None, help="segmentation annotator checkpoint")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--ddim", action="store_true", help="DDIM instead of UniPC (the original's flag)")
    parser.add_argument("--num_groups", type=int, default=4, help="images per prompt; group_k holds the k-th")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="images per pipeline call, rounded down to whole prompts (at least one prompt)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--generation_resolution", type=int, default=None,
                        help="generate at this size and upsample (bicubic) to --resolution, where conditions, "
                             "annotations and metrics stay; for models trained smaller than a metric needs "
                             "(the toy world's 64 px models: MS-SSIM needs images of at least 176 px). Default: --resolution")
    parser.add_argument("--negative_prompt", default="worst quality, low quality")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                        help="pipeline dtype; default fp16 on CUDA (the paper), no (fp32) on CPU")
    parser.add_argument("--output_dir", default=None,
                        help="default: work_dirs/eval_dirs/<dataset>/<split>/<model_path>_<cfg>-<steps> (the original's)")
    args = parser.parse_args(args)

    if args.model_path is None and args.model != ORACLE:
        parser.error("--model_path is required (the ControlNet or T2I-Adapter to evaluate)")
    if args.model == ORACLE:
        args.model_path = ORACLE  # recorded in eval_config.json; never loaded
    args.task_name = TASK_ALIASES.get(args.task_name, args.task_name)
    if args.task_name not in REWARD_MODELS:
        parser.error(f"--task_name must be one of {tuple(REWARD_MODELS)}, got {args.task_name!r}")
    annotator_class = reward_class(args.task_name)
    # depth / segmentation: a dataset column (control_depth / control_seg by default); canny / hed /
    # lineart: computed from the image by the annotator.
    args.condition_column = (args.condition_column or annotator_class.default_condition_column) \
        if annotator_class.needs_condition_column else None
    try:
        args.label_column, args.label_format, args.reward_model_name_or_path = annotator_class.evaluation_labels(
            args.label_column, args.label_format, args.reward_model_name_or_path)
    except ValueError as error:
        parser.error(str(error))
    if args.num_groups < 1 or args.num_inference_steps < 1 or args.resolution < 8 or args.resolution % 8:
        parser.error("--num_groups and --num_inference_steps must be >= 1 and --resolution a multiple of 8")
    if args.generation_resolution is not None and (args.generation_resolution < 8 or args.generation_resolution % 8
                                                   or args.generation_resolution > args.resolution):
        parser.error("--generation_resolution must be a multiple of 8, at most --resolution")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be >= 1")
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    if args.output_dir is None:
        args.output_dir = str(Path("work_dirs/eval_dirs") / Path(args.dataset_name).name / args.dataset_split
                              / f"{args.model_path.replace('/', '_')}_{args.guidance_scale}-{args.num_inference_steps}")
    try:  # NaN passes every comparison above (--guidance_scale nan turned guidance off)
        from utils.flags import MAX_RESOLUTION, check_local_path, check_writable_dir, reject_nonfinite, require

        reject_nonfinite(args)
        require(args, "guidance_scale", low=0)
        require(args, "resolution", high=MAX_RESOLUTION, why="larger images do not fit in any GPU's memory")
        require(args, "batch_size", low=1)
        for flag in ("sd_path", "vae_path", "dataset_name", *(("model_path",) if args.model != ORACLE else ())):
            check_local_path(f"--{flag}", getattr(args, flag))
        check_local_path("--reward_model_name_or_path", args.reward_model_name_or_path, kind="any")
        check_writable_dir("--output_dir", args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    return args


def image_seed(seed: int, row: int, group: int) -> int:
    """Seed of one image: distinct for every (seed, row, group), independent of everything else."""
    return int(np.random.SeedSequence([seed, row, group]).generate_state(1)[0])


def to_float(images_uint8: np.ndarray, device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device).permute(0, 3, 1, 2).float() / 255.0


def load_pipeline(args, dtype: torch.dtype):
    import diffusers

    def common() -> dict:
        kwargs = dict(torch_dtype=dtype)
        if args.vae_path:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(args.vae_path, torch_dtype=dtype)
        return kwargs

    if args.model == "controlnet":
        controlnet = diffusers.ControlNetModel.from_pretrained(args.model_path, torch_dtype=dtype)

        def frozen_parts() -> dict:  # everything but the ControlNet (reused across a sweep)
            parts = dict(diffusers.StableDiffusionControlNetPipeline.from_pretrained(
                args.sd_path, controlnet=controlnet, safety_checker=None, requires_safety_checker=False,
                **common()).components)
            parts.pop("controlnet")
            return parts

        parts = reused(("sd-parts", args.sd_path, args.vae_path, str(dtype)), frozen_parts)
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, requires_safety_checker=False)
    elif args.model == "t2i-adapter":
        adapter = diffusers.T2IAdapter.from_pretrained(args.model_path, torch_dtype=dtype)
        pipe = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
            args.sd_path, adapter=adapter, safety_checker=None, requires_safety_checker=False, **common())
    else:  # controlnet-sdxl
        controlnet = diffusers.ControlNetModel.from_pretrained(args.model_path, torch_dtype=dtype)
        pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(args.sd_path, controlnet=controlnet, **common())
    scheduler_class = diffusers.DDIMScheduler if args.ddim else diffusers.UniPCMultistepScheduler
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_columns(dataset, args) -> None:
    columns = set(dataset.column_names)
    wanted = {"--image_column": args.image_column, "--prompt_column": args.prompt_column,
              "--condition_column": args.condition_column, "--label_column": args.label_column}
    for flag, column in wanted.items():
        if column is not None and column not in columns:
            raise KeyError(f"{args.dataset_name} ({args.dataset_split}) has no column {column!r} ({flag}); "
                           f"its columns are {sorted(columns)}.")


def check_or_write_config(output_dir: Path, config: dict) -> None:
    """Refuse to complete a folder generated with other settings; record the settings otherwise."""
    path = output_dir / CONFIG_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [k for k in GENERATION_SETTINGS if previous.get(k) != config.get(k)]
        if changed:
            details = ", ".join(f"--{k} {previous.get(k)!r} there vs {config.get(k)!r} now" for k in changed)
            raise ValueError(f"{output_dir} holds images generated with other settings ({details}). Pass the same "
                             "settings to complete it, or another --output_dir.")
    save_json(config, path)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files of a killed run (utils.io.atomic_write names them .<name>.<random>.tmp)."""
    for path in output_dir.rglob(".*.tmp"):
        path.unlink(missing_ok=True)


def read_example(dataset, row: int, args) -> dict:
    """``dataset[row]``, its images decoded; an undecodable cell is named by dataset, split, row and column."""
    try:
        return dataset[row]
    except Exception as error:
        where = f"{args.dataset_name} (split {args.dataset_split}) row {row}"
        for column in dataset.column_names:  # which cell: decode them one by one (only on this error path)
            try:
                dataset.select_columns([column])[row]
            except Exception as cell_error:
                raise ValueError(f"{where}, column {column!r}: cannot decode it ({type(cell_error).__name__}: "
                                 f"{cell_error}). Fix or remove that row, or evaluate fewer rows (--max_samples)."
                                 ) from error
        raise ValueError(f"{where}: cannot read it ({type(error).__name__}: {error}).") from error


def read_row(dataset, row: int, args) -> dict:
    """Real image, prompt, condition / label images of one row, resized to the resolution."""
    example = read_example(dataset, row, args)
    size = (args.resolution, args.resolution)
    prompt = example[args.prompt_column]
    if isinstance(prompt, (list, tuple)) and prompt:  # several captions: the first at evaluation (REFERENCE)
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError(f"{args.dataset_name} (split {args.dataset_split}) row {row}, column {args.prompt_column!r} "
                         f"(--prompt_column): expected a caption string or a list of them, got {prompt!r}.")
    # Bicubic as in training and in the original evaluation; labels nearest (no blended classes).
    item = {"row": row, "prompt": prompt, "image": to_mode(example[args.image_column], "RGB").resize(size, Image.BICUBIC)}
    if args.condition_column:
        item["condition"] = to_mode(example[args.condition_column], "RGB").resize(size, Image.BICUBIC)
    if args.label_column:
        item["label"] = example[args.label_column]
    return item


def conditions_and_annotations(items: list[dict], annotator, args, device) -> tuple[np.ndarray, np.ndarray]:
    """ControlNet inputs (B, H, W, 3) uint8 and what the metric compares with (B, H, W) uint8."""
    if args.condition_column is None:
        # canny / hed / lineart: the annotator's condition of the real image, stored as the original
        # stored it, is both the ControlNet input and the annotation (canny: the real image's binary
        # edges after hysteresis; hed, lineart: the input condition).
        real = to_float(np.stack([np.asarray(item["image"]) for item in items]), device)
        conditions = annotator.condition_uint8(real).permute(0, 2, 3, 1).cpu().numpy()
        return conditions, conditions[..., 0]
    # depth: the raw control_depth as the original stored it; segmentation: class indices, 255 = ignore.
    conditions = np.stack([np.asarray(item["condition"]) for item in items])
    return conditions, np.stack([annotator.label_annotation(item["label"], args.resolution) for item in items])


def visualization(condition: np.ndarray, real: np.ndarray, generated: np.ndarray, extracted: np.ndarray) -> np.ndarray:
    """Top: input condition | the generations; bottom: real image | their extracted conditions."""
    top = np.concatenate([condition, *generated], axis=1)
    bottom = np.concatenate([real, *extracted], axis=1)
    return np.concatenate([top, bottom], axis=0)


def main(args=None):
    args = parse_args(args)
    full_float32()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    # PartialState (unlike Accelerator) ignores ACCELERATE_USE_CPU: without cpu=True, processes
    # launched on a machine without CUDA would each run the whole evaluation alone.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    output_dir = Path(args.output_dir)

    dataset = load_dataset_any(args.dataset_name, args.dataset_split, cache_dir=args.cache_dir)
    if args.prompt_column is None:
        args.prompt_column = "text" if "text" in dataset.column_names else "prompt"
    check_columns(dataset, args)
    num_rows = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        check_or_write_config(output_dir, {**vars(args), "num_rows": num_rows, "condition_protocol": CONDITION_PROTOCOL})
        remove_stale_temporaries(output_dir)
    state.wait_for_everyone()

    # Fixed chunks of the row list; a chunk is (re)generated when any of its rows is incomplete.
    # Every process scans before any process writes (the barrier below), so all agree on the plan.
    rows_per_batch = max(1, args.batch_size // args.num_groups)
    chunks = [list(range(i, min(i + rows_per_batch, num_rows))) for i in range(0, num_rows, rows_per_batch)]
    todo = [c for c in chunks if not all(p.is_file() for r in c for p in row_files(output_dir, r, args.num_groups))]
    state.wait_for_everyone()
    mine = todo[state.process_index::state.num_processes]
    if state.is_main_process:
        print(f"{num_rows} rows x {args.num_groups} images: {len(chunks) - len(todo)} of {len(chunks)} batches done, "
              f"{len(todo)} to generate on {state.num_processes} process(es) -> {output_dir}", flush=True)

    if not todo:
        return
    with state.main_process_first():  # the first process fills caches, the others read them
        pipe = None if args.model == ORACLE else load_pipeline(args, dtype).to(state.device)
        annotator_class = reward_class(args.task_name)
        # --reward_model_checkpoint / --label_format only reach a model that takes them (segmentation).
        options = {name: value for name, value in (("checkpoint", args.reward_model_checkpoint),
                                                   ("label_format", args.label_format))
                   if name in annotator_class.build_options}
        annotator = reward_model(args.task_name, args.reward_model_name_or_path, state.device, **options)
    single_channel = args.model == "t2i-adapter" and pipe.adapter.config.in_channels == 1
    generation_size = args.generation_resolution or args.resolution

    start = time.perf_counter()
    for chunk in tqdm(mine, desc=f"generating (process {state.process_index})", disable=not state.is_main_process):
        items = [read_row(dataset, row, args) for row in chunk]
        # The real rows' conditions and annotations do not depend on the model being evaluated.
        conditions, annotations = reused(
            ("conditions", args.dataset_name, args.dataset_split, tuple(chunk), args.resolution, args.image_column,
             args.condition_column, args.label_column, args.label_format, args.task_name,
             args.reward_model_name_or_path, args.reward_model_checkpoint, str(state.device)),
            lambda: conditions_and_annotations(items, annotator, args, state.device))
        condition_images = [Image.fromarray(c).convert("L" if single_channel else "RGB") for c in conditions]
        # Row-major: row 0 group 0..G-1, row 1 group 0..G-1, ...; one generator per image.
        generators = [torch.Generator("cpu").manual_seed(image_seed(args.seed, item["row"], g))
                      for item in items for g in range(args.num_groups)]
        if args.model == ORACLE:  # the real images, at the generation resolution (bicubic, as read_row)
            generated = np.stack([np.asarray(item["image"].resize((generation_size,) * 2, Image.BICUBIC))
                                  for item in items for _ in range(args.num_groups)]).astype(np.float32) / 255
        else:
            with torch.no_grad():
                generated = pipe(
                    prompt=[item["prompt"] for item in items for _ in range(args.num_groups)],
                    image=[c for c in condition_images for _ in range(args.num_groups)],
                    negative_prompt=[args.negative_prompt] * len(generators),
                    height=args.generation_resolution or args.resolution,
                    width=args.generation_resolution or args.resolution,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    generator=generators, output_type="np",  # "np" works for every pipeline class
                ).images
        if generated.shape[1] != args.resolution:  # --generation_resolution: upsample to the metric's size
            upsampled = torch.nn.functional.interpolate(torch.from_numpy(generated).permute(0, 3, 1, 2),
                                                        size=(args.resolution, args.resolution), mode="bicubic")
            generated = upsampled.permute(0, 2, 3, 1).numpy()
        # (B, H, W, 3) float in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil; what is saved
        # is what gets scored.
        generated = (np.clip(generated, 0, 1) * 255).round().astype(np.uint8)
        extracted = annotator.extracted_uint8(to_float(generated, state.device)).permute(0, 2, 3, 1).cpu().numpy()
        # Edge and depth conditions are grey maps repeated x3: stored with one channel.
        stored = extracted if annotator.condition_is_palette else extracted[..., 0]
        generated = generated.reshape(len(items), args.num_groups, *generated.shape[1:])
        extracted = extracted.reshape(len(items), args.num_groups, *extracted.shape[1:])
        stored = stored.reshape(len(items), args.num_groups, *stored.shape[1:])
        for i, item in enumerate(items):
            row = item["row"]
            save_image(annotations[i], annotation_path(output_dir, row))
            for g in range(args.num_groups):
                save_image(generated[i, g], generated_path(output_dir, g, row))
                save_image(stored[i, g], condition_path(output_dir, g, row))
            # Written last: its presence means the row is complete (all files are atomic).
            save_image(visualization(conditions[i], np.asarray(item["image"]), generated[i], extracted[i]),
                       visualization_path(output_dir, row))
    elapsed = time.perf_counter() - start
    print(f"process {state.process_index}: {sum(map(len, mine)) * args.num_groups} images in {elapsed:.1f} s", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"done: {output_dir}", flush=True)


if __name__ == "__main__":
    main()
