"""Plain ControlNet fine-tuning (diffusion loss only): stage one of segmentation in ControlNet++.

For ADE20K and COCO-Stuff the paper first fine-tunes lllyasviel/control_v11p_sd15_seg on the
training set for 5k steps with the usual diffusion loss, then reward-fine-tunes that model
(arXiv 2404.07987, Sec. 4.1); train/finetune_{ade20k,cocostuff}.sh run this stage. Same flags,
data code, loop and outputs as train/reward_control.py, without a reward model.

    accelerate launch train/train_controlnet.py \
        --pretrained_model_name_or_path work_dirs/toy/toy-sd15 \
        --controlnet_model_name_or_path work_dirs/toy/toy-controlnet \
        --dataset_name work_dirs/toy/datasets/Captioned_ADE20K --caption_column prompt \
        --conditioning_image_column control_seg --resolution 64 --train_batch_size 2 \
        --max_train_steps 3 --output_dir work_dirs/ade20k-finetune-toy

Tasks whose condition is computed from the image (canny, hed, lineart) pass
``--condition_detector <task>`` (and ``--condition_detector_path`` for its weights) instead of
``--conditioning_image_column``: the condition is then extracted on the device exactly as in
reward fine-tuning and evaluation. The toy experiment trains its baselines this way.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

from reward_models import build_reward_model  # noqa: E402
from utils import training  # noqa: E402


def parse_args(input_args=None):
    parser = training.build_parser(__doc__.split("\n")[0], reward=False)
    return training.validate_args(parser.parse_args(input_args))


def main(args) -> None:
    accelerator = training.make_accelerator(args)
    parts = training.load_stable_diffusion(args, accelerator.device, training.weight_dtype_of(accelerator))
    detector = None
    if args.condition_detector is not None:  # canny / hed / lineart: the condition comes from the image
        detector = build_reward_model(args.condition_detector, args.condition_detector_path,
                                      device=accelerator.device, dtype=parts.weight_dtype)
    rows = training.build_train_rows(args, parts.tokenizer, detector)
    training.train(args, accelerator, parts, rows, detector)


if __name__ == "__main__":
    main(parse_args())
