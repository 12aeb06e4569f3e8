"""ControlNet++ reward fine-tuning: diffusion loss + grad_scale * cycle-consistency reward.

Paper: "ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback"
(ECCV 2024, arXiv 2404.07987). A pretrained ControlNet on a frozen SD1.5 is fine-tuned so that a
frozen reward model (edge detector, depth estimator, segmenter) applied to the one-step image
estimate x0(t) gives back the input condition, for samples noised to t <= 200.

Launch (from the repository root; the paper's settings are in train/reward_<task>.sh):

    # one GPU (or CPU), e.g. on the toy world of `python -m utils.toy --out work_dirs/toy`
    accelerate launch train/reward_control.py --task_name canny \
        --pretrained_model_name_or_path work_dirs/toy/toy-sd15 \
        --controlnet_model_name_or_path work_dirs/toy/toy-controlnet \
        --reward_model_name_or_path canny --dataset_name work_dirs/toy/datasets/MultiGen-20M_train \
        --caption_column text --resolution 64 --train_batch_size 2 --max_train_steps 3 \
        --output_dir work_dirs/canny-toy
    # one node of 8 GPUs (paper): NUM_PROCESSES=8 train/reward_canny.sh
    # several nodes: accelerate launch --config_file train/configs/multi_node.yaml \
    #     --machine_rank $RANK --main_process_ip $MASTER train/reward_control.py ...

The step (utils/training.py: training_step), per batch:
    t ~ U[timestep_sampling_start, timestep_sampling_end); x_t = noised latent of the image
    eps_hat = UNet(x_t, t, text, ControlNet(x_t, t, text, condition))
    diffusion_loss = MSE(eps_hat, eps)
    mask = min_timestep_rewarding <= t <= max_timestep_rewarding
    for the masked samples only: x0 = single-step estimate, image = VAE.decode(x0) in [0, 1],
        r_i = reward_model.loss(reward_model(image), reward_model.target(batch))
    reward_loss = sum(r_i) / (mask.sum() + 1e-10)
    loss = diffusion_loss_weight * diffusion_loss + grad_scale * reward_loss

Outputs in --output_dir: see utils/training.py: train (final ControlNet in the folder itself,
EMA in controlnet_ema/, checkpoint-<N>/, validation/step-<N>/, training_config.json, logs/).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/, reward_models/

from reward_models import build_reward_model  # noqa: E402
from utils import training  # noqa: E402


def parse_args(input_args=None):
    parser = training.build_parser(__doc__.split("\n")[0], reward=True)
    return training.validate_args(parser.parse_args(input_args))


def main(args) -> None:
    accelerator = training.make_accelerator(args)
    parts = training.load_stable_diffusion(args, accelerator.device, training.weight_dtype_of(accelerator))
    # Frozen, in the mixed-precision dtype like the other frozen models (its losses are fp32).
    reward_model = build_reward_model(
        args.task_name, args.reward_model_name_or_path, checkpoint=args.reward_model_checkpoint,
        label_format=args.label_format, device=accelerator.device, dtype=parts.weight_dtype,
    )
    training.resolve_label_column(args, reward_model)  # ADE20K without --label_column: the palette condition
    rows = training.build_train_rows(args, parts.tokenizer, reward_model)
    training.train(args, accelerator, parts, rows, reward_model)


if __name__ == "__main__":
    main(parse_args())
