"""Gradio demo of ControlNet++: one tab per task, as in the paper's demo.

On the toy world (tiny random models, CPU, written to work_dirs/toy if missing):

    python inference/app.py --toy

On real weights (SD1.5 and the released ControlNet++ weights are fetched from the hub when no
path is given; local folders work offline):

    python inference/app.py --sd_path /models/sd15 \
        --controlnet_path canny=work_dirs/reward_canny hed=/models/cnpp_hed \
        --reward_model_name_or_path hed=/models/ControlNetHED.pth

Each tab: upload an image and its condition is extracted at once (the task's annotator, the
reward model of training); enter a prompt, choose seed, steps, guidance and number of images,
press Generate. The page then shows the generated images and, as the original demo does, the
conditions extracted back from them: the closer they are to the input condition, the better
the control (the cycle consistency ControlNet++ optimises).

Stable Diffusion is loaded once at start; each task's ControlNet and annotator are loaded on
first use and kept (see `ModelCache`), so switching tabs back and forth reloads nothing.
The server listens on 127.0.0.1 unless `--host` says otherwise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

import argparse
import os

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
    resize_image,
)
from inference.models import ModelCache, extract_condition
from inference.paths import DEFAULT_SD_PATH, resolve_controlnet_path, toy_model_paths
from reward_models import reward_class
from utils.images import to_mode

DEFAULT_TOY_DIR = "work_dirs/toy"
MAX_IMAGES = 4
IMAGE_HEIGHT = 300  # pixels on the page; toy images (64 px) are scaled up to it
MAX_RESOLUTION = 1024


def parse_args(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ControlNet++ Gradio demo.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--toy", nargs="?", const=DEFAULT_TOY_DIR, default=None, metavar="DIR",
                        help=f"use a toy world's models (written there if missing; DIR: {DEFAULT_TOY_DIR} "
                             "when omitted)")
    parser.add_argument("--sd_path", default=None,
                        help=f"Stable Diffusion 1.5 folder or hub id (default: {DEFAULT_SD_PATH})")
    parser.add_argument("--controlnet_path", nargs="+", default=[], metavar="[TASK=]PATH",
                        help="ControlNet folder or hub id per task (TASK=PATH), or one PATH for every task; "
                             "tasks not given use the released ControlNet++ weights")
    parser.add_argument("--reward_model_name_or_path", nargs="+", default=[], metavar="[TASK=]PATH",
                        help="annotator weights per task (TASK=PATH); default: the paper's, downloaded once")
    parser.add_argument("--reward_model_checkpoint", default=None,
                        help="segmentation only: the checkpoint of an mmseg config given as its annotator")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tabs to show")
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"default shorter side (default: {DEFAULT_RESOLUTION}; {TOY_RESOLUTION} with --toy)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the demo)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    args = parser.parse_args(args)
    try:
        args.controlnet_path = per_task_paths(args.controlnet_path, "--controlnet_path")
        args.reward_model_name_or_path = per_task_paths(args.reward_model_name_or_path, "--reward_model_name_or_path")
    except InferenceError as error:
        parser.error(str(error))
    if args.resolution is not None and not 8 <= args.resolution <= MAX_RESOLUTION:
        parser.error(f"--resolution must be between 8 and {MAX_RESOLUTION}, got {args.resolution}.")
    return args


def per_task_paths(values: list[str], flag: str) -> dict:
    """["canny=/a", "hed=/b"] -> {"canny": "/a", "hed": "/b"}; a bare PATH applies to every task."""
    paths = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep:
            paths.update({name: value for name in TASKS if name not in paths})
        elif task in TASKS and path:
            paths[task] = path
        else:
            raise InferenceError(
                f"{flag} {value!r}: expected TASK=PATH with TASK one of {', '.join(TASKS)}, or a PATH.")
    return paths


class Demo:
    """The demo's callbacks: condition preview and generation, on shared cached models."""

    def __init__(self, models: ModelCache, default_resolution: int):
        self.models = models
        self.default_resolution = default_resolution

    def condition(self, task: str, image, resolution: float, canny_low: float = DEFAULT_CANNY_LOW_THRESHOLD,
                  canny_high: float = DEFAULT_CANNY_HIGH_THRESHOLD):
        """The ControlNet input for an uploaded image (None while no image is uploaded)."""
        if image is None:
            return None
        image = resize_image(to_mode(image, "RGB"), generation_size(*image.size, int(resolution)))
        with self.models.lock:
            return extract_condition(self.models.annotator(task), image, (canny_low, canny_high))

    def generate(self, task: str, image, prompt: str, negative_prompt: str, num_images: float, resolution: float,
                 steps: float, guidance_scale: float, controlnet_conditioning_scale: float, seed: float,
                 canny_low: float = DEFAULT_CANNY_LOW_THRESHOLD, canny_high: float = DEFAULT_CANNY_HIGH_THRESHOLD):
        """(condition, generated images, conditions extracted from the generated images)."""
        if image is None:
            raise InferenceError("upload an image first.")
        if seed is None or num_images is None or steps is None:
            raise InferenceError("fill in the seed, the number of images and the steps.")
        condition = self.condition(task, image, resolution, canny_low, canny_high)
        with self.models.lock:
            images = generate_images(
                self.models.pipeline(task), condition, prompt or "", negative_prompt=negative_prompt,
                num_images=int(num_images), steps=int(steps), guidance_scale=float(guidance_scale),
                controlnet_conditioning_scale=float(controlnet_conditioning_scale), seed=int(seed))
            annotator = self.models.annotator(task)
            cycle = [extract_condition(annotator, generated, (canny_low, canny_high)) for generated in images]
        return condition, images, cycle


def as_gradio_errors(function):
    """Show an InferenceError as a message in the page instead of a generic 'Error'."""
    import functools

    import gradio as gr

    @functools.wraps(function)
    def wrapped(*args):
        try:
            return function(*args)
        except InferenceError as error:
            raise gr.Error(str(error)) from error

    return wrapped


def task_tab(demo: Demo, task: str) -> None:
    """The widgets and events of one task's tab; element ids are `<task>-<widget>` (used by tests)."""
    import functools

    import gradio as gr

    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Input image", type="pil", sources=["upload", "clipboard"], format="png",
                             height=IMAGE_HEIGHT, elem_id=f"{task}-input")
            prompt = gr.Textbox(label="Prompt", elem_id=f"{task}-prompt")
            run = gr.Button("Generate", variant="primary", elem_id=f"{task}-run")
            with gr.Accordion("Options", open=True):
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images",
                                           elem_id=f"{task}-num-images")
                    seed = gr.Number(DEFAULT_SEED, precision=0, minimum=0, label="Seed", elem_id=f"{task}-seed")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps (UniPC)",
                                      elem_id=f"{task}-steps")
                    guidance = gr.Slider(0.0, 30.0, value=DEFAULT_GUIDANCE_SCALE, step=0.1, label="Guidance scale",
                                         elem_id=f"{task}-guidance")
                with gr.Row():
                    resolution = gr.Slider(64, MAX_RESOLUTION, value=demo.default_resolution, step=8,
                                           label="Resolution (shorter side)", elem_id=f"{task}-resolution")
                    conditioning_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="ControlNet scale",
                                                   elem_id=f"{task}-controlnet-scale")
                thresholds = []  # the canny tab's extra input, passed after the common ones
                annotator_class = reward_class(task)
                if annotator_class.annotation_thresholds is not None:
                    # The original demo's two sliders (hysteresis: low <= high).
                    low, high = annotator_class.annotation_thresholds
                    thresholds = [gr.Slider(0.01, 0.99, value=low, step=0.01, label=f"{annotator_class.title} low "
                                            "threshold", elem_id=f"{task}-threshold"),
                                  gr.Slider(0.01, 0.99, value=high, step=0.01, label=f"{annotator_class.title} high "
                                            "threshold", elem_id=f"{task}-high-threshold")]
                negative_prompt = gr.Textbox(DEFAULT_NEGATIVE_PROMPT, label="Negative prompt")
        with gr.Column():
            condition = gr.Image(label="Condition (extracted from the input)", type="pil", format="png",
                                 interactive=False, height=IMAGE_HEIGHT, elem_id=f"{task}-condition")
            # fit_columns=False: one image takes one column, not the whole width (it would overflow).
            output = gr.Gallery(label="Generated images", format="png", columns=2, fit_columns=False,
                                object_fit="contain", height=IMAGE_HEIGHT, elem_id=f"{task}-output")
            cycle = gr.Gallery(label="Conditions extracted from the generated images", format="png", columns=2,
                               fit_columns=False, object_fit="contain", height=IMAGE_HEIGHT,
                               elem_id=f"{task}-output-conditions")

    preview = as_gradio_errors(functools.partial(demo.condition, task))
    preview_inputs = [image, resolution, *thresholds]
    image.change(preview, inputs=preview_inputs, outputs=condition, api_name=f"{task}_condition")
    for slider in [resolution, *thresholds]:
        slider.release(preview, inputs=preview_inputs, outputs=condition, api_name=False)
    run_inputs = [image, prompt, negative_prompt, num_images, resolution, steps, guidance, conditioning_scale, seed,
                  *thresholds]
    generate = as_gradio_errors(functools.partial(demo.generate, task))
    for trigger in (run.click, prompt.submit):
        trigger(generate, inputs=run_inputs, outputs=[condition, output, cycle],
                api_name=task if trigger == run.click else False)


def build_app(demo: Demo, tasks: list[str], description: str):
    import gradio as gr

    with gr.Blocks(title="ControlNet++", analytics_enabled=False) as blocks:
        gr.Markdown(
            "# ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback\n"
            "Upload an image: its condition is extracted by the task's annotator and fed to Stable Diffusion 1.5 "
            "with the task's ControlNet. The last gallery shows the conditions extracted back from the generated "
            "images; the closer they match the input condition, the better the control.")
        with gr.Accordion("Models", open=False):
            gr.Markdown(description)
        with gr.Tabs():
            for task in tasks:
                with gr.Tab(reward_class(task).title, id=task, elem_id=f"{task}-tab"):
                    task_tab(demo, task)
    return blocks


def main(args=None) -> None:
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    # The demo works offline: no usage statistics or version checks sent to gradio.app.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    controlnet_paths, annotator_paths = dict(args.controlnet_path), dict(args.reward_model_name_or_path)
    sd_path, resolution = args.sd_path, args.resolution
    if args.toy:
        toy_sd_path, toy_controlnet_path, toy_annotators = toy_model_paths(
            args.toy, [task for task in args.tasks if task not in annotator_paths])
        sd_path = sd_path or toy_sd_path
        controlnet_paths = {task: controlnet_paths.get(task, toy_controlnet_path) for task in TASKS}
        annotator_paths = {**toy_annotators, **annotator_paths}
        resolution = resolution or TOY_RESOLUTION
    sd_path, resolution = sd_path or DEFAULT_SD_PATH, resolution or DEFAULT_RESOLUTION
    # Local ControlNet folders are checked now, so a wrong path fails at start, not at the first click.
    for task in args.tasks:
        if task in controlnet_paths:
            controlnet_paths[task] = resolve_controlnet_path(controlnet_paths[task], task,
                                                             flag=f"--controlnet_path (task {task})")
    device, dtype = choose_device_and_dtype(args.device, args.dtype)
    models = ModelCache(sd_path, controlnet_paths, annotator_paths, device=device, dtype=dtype,
                        annotator_checkpoint=args.reward_model_checkpoint)
    default_annotator = {task: "paper default" if reward_class(task).has_weights else "no weights" for task in args.tasks}
    description = "\n".join(
        [f"- Stable Diffusion: `{models.sd_path}` on {device}, {str(dtype).removeprefix('torch.')}"]
        + [f"- {reward_class(task).title}: ControlNet `{controlnet_paths.get(task, 'released ControlNet++ (hub)')}`, "
           f"annotator `{annotator_paths.get(task) or default_annotator[task]}`"
           for task in args.tasks]
        + (["- **Toy world**: random tiny models; the images are noise-like by design."] if args.toy else []))

    import gradio as gr

    blocks = build_app(Demo(models, resolution), args.tasks, description)
    print(f"ControlNet++ demo on http://{args.host}:{args.port}", flush=True)
    blocks.queue(max_size=20).launch(server_name=args.host, server_port=args.port, show_error=True,
                                     theme=gr.themes.Default())


if __name__ == "__main__":
    try:
        main()
    except InferenceError as error:
        sys.exit(f"error: {error}")
