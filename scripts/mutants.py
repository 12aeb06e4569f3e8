"""One-line mutants: does the test suite notice when a line that matters is wrong?

    .venv/bin/python scripts/mutants.py                 # every mutant against its listed tests
    .venv/bin/python scripts/mutants.py --only hed      # mutants whose name contains "hed"
    .venv/bin/python scripts/mutants.py --list          # names, files and tests, runs nothing
    .venv/bin/python scripts/mutants.py --full          # each mutant against the whole default tier (slow)

For each entry of MUTANTS the working tree (tracked and untracked files git does not ignore) is
copied to a temporary folder, one exact snippet of one file is replaced, and pytest runs the
listed tests there (with the session toy world of this tree, ``TOY_WORLD_DIR``, so a mutant in a
reward model does not regenerate the world). A mutant is *caught* when pytest fails. The script
exits non-zero when a mutant survives, when its snippet no longer occurs exactly once in the file
(the list must follow the code, it cannot rot silently) or when a listed test fails on the
unmutated copy (then "caught" would mean nothing; ``--no-baseline`` skips that check).

The habit (README, "Contributing"): before resolving a change, flip one line of what you wrote
and watch a test fail; if none does, add the test and the mutant here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root
    why: str = ""


T_LOSSES = "tests/test_losses.py"
T_HED = "tests/test_reward_forward.py::test_hed_is_the_sigmoid_of_the_mean_of_the_upsampled_side_outputs"
T_LINEART = "tests/test_reward_forward.py::test_line_drawing_follows_the_published_generator_and_the_condition_is_inverted"
T_DPT = "tests/test_reward_forward.py::test_dpt_input_normalisation_and_per_sample_max"
T_SEG_INPUT = "tests/test_reward_forward.py::test_segmentation_input_is_what_mmseg_data_preprocessor_makes"
T_SEG_PREDICT = "tests/test_reward_forward.py::test_segmentation_predict_matches_mmseg_inference_model"
T_MASK2FORMER = "tests/test_reward_forward.py::test_mask2former_evaluator_predict_matches_mmseg_inference_model"
T_CLIP_LR = "tests/test_schedules.py::test_clipping_warmup_and_scale_lr"
T_WORKERS_RESUME = "tests/test_schedules.py::test_worker_processes_and_an_explicit_resume_path_train_like_the_plain_run"
T_MIXED = "tests/test_mixed_precision.py::test_half_precision_step_keeps_fp32_master_weights_and_matches_fp32"
T_VAE_DDIM = "tests/test_eval_options.py::test_vae_path_and_ddim_reach_the_pipeline"
T_REAL_IMAGES = "tests/test_eval_options.py::test_real_image_path_is_what_fid_compares_with"
T_CPO_LOSS = "tests/test_cpo.py::test_cpo_loss_equals_the_formula_and_its_gradient"
T_CPO_FLAGS = "tests/test_cpo.py::test_cpo_flags_find_the_loser_column_by_cpos_rule_and_refuse_what_does_not_apply"
T_CPO_STEP = "tests/test_cpo.py::test_cpo_step_trains_only_the_controlnet_and_never_moves_the_reference"
T_CPO_SAME = "tests/test_cpo.py::test_identical_winner_and_loser_give_half_the_margin_and_no_preference_gradient"
T_CPO_STEP_SAME = T_CPO_SAME
T_CPO_DATA = "tests/test_cpo.py::test_preference_data_holds_the_rows_with_eval_conditions_as_winner_and_loser"

MUTANTS: list[Mutant] = [
    # ---- the four misses of issue 17
    Mutant("epsilon-target-is-latents", "utils/diffusion.py",
           'if prediction_type == "epsilon":\n        return noise',
           'if prediction_type == "epsilon":\n        return latents',
           (T_LOSSES,), "the epsilon target returns the clean latents instead of the noise"),
    Mutant("hed-mean-of-sigmoids", "reward_models/hed.py",
           "return torch.sigmoid(torch.stack(side_outputs, dim=0).mean(dim=0))",
           "return torch.stack([torch.sigmoid(s) for s in side_outputs], dim=0).mean(dim=0)",
           (T_HED,), "HED fuses its side outputs as the mean of sigmoids"),
    Mutant("segmentation-input-without-x255", "reward_models/segmentation.py",
           "return ((images.float() * 255.0 - self.mean.float()) / self.std.float()).to(self.dtype)",
           "return ((images.float() - self.mean.float()) / self.std.float()).to(self.dtype)",
           (T_SEG_INPUT,), "the segmentation reward's input loses mmseg's 0..255 scale"),
    Mutant("toy-table-bolds-the-worst", "toy/experiment.py",
           'best = (max if entry["higher_is_better"] else min)',
           'best = (min if entry["higher_is_better"] else max)',
           ("tests/test_toy_experiment.py::test_table_bolds_the_best_variant_in_each_direction",),
           "the toy table bolds the worst variant"),
    # ---- the ones the default tier already caught (kept so that it stays so)
    Mutant("reward-window-excludes-max", "utils/diffusion.py",
           "(timesteps <= max_t)", "(timesteps < max_t)",
           ("tests/test_train_step.py::test_reward_window_mask_includes_both_ends",)),
    Mutant("ema-restore-without-copy", "utils/ema.py",
           "stored = {name: params[name].detach().clone() for name in self.shadow}",
           "stored = {name: params[name].detach() for name in self.shadow}",
           ("tests/test_train_step.py::test_validation_with_ema_leaves_training_weights_bit_identical",)),
    Mutant("resume-skip-without-accumulation", "train/reward_control.py",
           "skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps",
           "skip_batches = global_step % steps_per_epoch",
           ("tests/test_train_e2e.py::test_two_processes_train_checkpoint_and_resume_like_an_uninterrupted_run",)),
    Mutant("all-ignore-crop-gives-nan", "reward_models/base.py",
           "valid.sum(dim=1).clamp_min(1.0)", "valid.sum(dim=1)",
           ("tests/test_reward_models.py::test_segmentation_from_toy_folder",)),
    # ---- the diffusion target and loss
    Mutant("v-target-arguments-swapped", "utils/diffusion.py",
           "return noise_scheduler.get_velocity(latents, noise, timesteps)",
           "return noise_scheduler.get_velocity(noise, latents, timesteps)", (T_LOSSES,)),
    Mutant("diffusion-loss-summed", "train/reward_control.py",
           'diffusion_loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")',
           'diffusion_loss = F.mse_loss(model_pred.float(), target.float(), reduction="sum")', (T_LOSSES,)),
    Mutant("diffusion-loss-weight-ignored", "train/reward_control.py",
           "loss = args.diffusion_loss_weight * prediction.diffusion_loss",
           "loss = prediction.diffusion_loss", (T_LOSSES,)),
    # ---- the reward models' forward maths
    Mutant("hed-without-x255", "reward_models/hed.py",
           "images_255 = (images.to(self.dtype) * 255.0).clamp(0, 255)",
           "images_255 = images.to(self.dtype).clamp(0, 255)", (T_HED,)),
    Mutant("hed-no-norm-subtraction", "reward_models/hed.py",
           "h = images_255 - self.norm", "h = images_255", (T_HED,)),
    Mutant("hed-nearest-upsampling", "reward_models/hed.py",
           'mode="bilinear", align_corners=False) for side in side_outputs]',
           'mode="nearest") for side in side_outputs]', (T_HED,)),
    Mutant("lineart-residual-dropped", "reward_models/lineart.py",
           "return x + self.conv_block(x)", "return self.conv_block(x)", (T_LINEART,)),
    Mutant("lineart-condition-not-inverted", "reward_models/lineart.py",
           "return (1 - self(images).float()).repeat(1, 3, 1, 1)",
           "return self(images).float().repeat(1, 3, 1, 1)", (T_LINEART,)),
    Mutant("dpt-without-normalisation", "reward_models/depth.py",
           "x = (x - DPT_MEAN) / DPT_STD", "x = x", (T_DPT,)),
    Mutant("dpt-max-over-the-batch", "reward_models/depth.py",
           "peak = depth.flatten(1).amax(dim=1).clamp_min(MAX_EPSILON)",
           "peak = depth.amax().clamp_min(MAX_EPSILON).expand(depth.shape[0])", (T_DPT,)),
    Mutant("segmentation-rgb-as-bgr", "reward_models/segmentation.py",
           'self.register_buffer("mean", torch.tensor(preprocessor.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)',
           'self.register_buffer("mean", torch.tensor(preprocessor.get("mean", IMAGENET_MEAN)).flip(0).view(1, 3, 1, 1)',
           (T_SEG_INPUT,)),
    Mutant("segmentation-predict-nearest-logits", "reward_models/segmentation.py",
           'logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)',
           'logits = F.interpolate(logits.float(), size=(height, width), mode="nearest")', (T_SEG_PREDICT, T_MASK2FORMER)),
    Mutant("segmentation-predict-ignores-test-resize", "reward_models/segmentation.py",
           "if size != (height, width):", "if False:", (T_SEG_PREDICT, T_MASK2FORMER)),
    # ---- mixed precision
    Mutant("controlnet-not-kept-fp32", "train/reward_control.py",
           "    controlnet.train()\n    controlnet.to(device)\n",
           "    controlnet.train()\n    controlnet.to(device, dtype=weight_dtype)\n", (T_MIXED,)),
    Mutant("frozen-models-not-in-the-mixed-precision-dtype", "train/reward_control.py",
           "        frozen.to(device, dtype=weight_dtype)\n", "        frozen.to(device)\n", (T_MIXED,)),
    # ---- optimisation schedules
    Mutant("gradient-clipping-skipped", "train/reward_control.py",
           "if accelerator.sync_gradients and args.max_grad_norm > 0:",
           "if accelerator.sync_gradients and args.max_grad_norm < 0:", (T_CLIP_LR,)),
    Mutant("warmup-without-process-factor", "train/reward_control.py",
           "num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,",
           "num_warmup_steps=args.lr_warmup_steps,",
           ("tests/test_train_e2e.py::test_two_processes_train_checkpoint_and_resume_like_an_uninterrupted_run",)),
    Mutant("scale-lr-without-accumulation", "train/reward_control.py",
           "args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes",
           "args.learning_rate *= args.train_batch_size * accelerator.num_processes", (T_CLIP_LR,)),
    # ---- the Ctrl-U second prediction
    Mutant("ctrl-u-second-branch-detached", "train/reward_control.py",
           "output_later = reward_model(decode_x0(parts, noisy_later, pred_later, later))",
           "output_later = reward_model(decode_x0(parts, noisy_later, pred_later.detach(), later))",
           ("tests/test_ctrl_u.py::test_ctrl_u_step_gives_the_controlnet_a_gradient_through_both_timesteps",)),
    Mutant("ctrl-u-fresh-noise", "train/reward_control.py",
           "noisy_later = parts.noise_scheduler.add_noise(prediction.latents[index], prediction.noise[index], later)",
           "noisy_later = parts.noise_scheduler.add_noise(prediction.latents[index], "
           "torch.randn_like(prediction.noise[index]), later)",
           ("tests/test_ctrl_u.py::test_ctrl_u_step_gives_the_controlnet_a_gradient_through_both_timesteps",)),
    Mutant("ctrl-u-same-timestep", "train/reward_control.py",
           "later = (timesteps + args.uncertainty_timestep_offset)", "later = (timesteps + 0)",
           ("tests/test_ctrl_u.py::test_ctrl_u_step_gives_the_controlnet_a_gradient_through_both_timesteps",)),
    # ---- the sampled timesteps and noise
    Mutant("timesteps-ignore-sampling-start", "train/reward_control.py",
           "sampled = torch.randint(args.timestep_sampling_start, args.timestep_sampling_end,",
           "sampled = torch.randint(0, args.timestep_sampling_end,", (T_LOSSES,)),
    Mutant("rewarded-fraction-of-the-window", "train/reward_control.py",
           "rewarded_fraction = mask.float().mean().item()", "rewarded_fraction = float(mask.any())", (T_LOSSES,)),
    Mutant("same-noise-on-every-rank", "train/reward_control.py",
           "np.random.SeedSequence([seed, process_index, global_step, micro_step])",
           "np.random.SeedSequence([seed, global_step, micro_step])", (T_LOSSES,)),
    # ---- data loading, resume, condition dropout
    Mutant("persistent-workers-miss-the-epoch", "train/reward_control.py",
           "collate_fn=collate_rows, num_workers=args.dataloader_num_workers)",
           "collate_fn=collate_rows, num_workers=args.dataloader_num_workers, "
           "persistent_workers=args.dataloader_num_workers > 0)", (T_WORKERS_RESUME,)),
    Mutant("explicit-resume-path-treated-as-latest", "utils/checkpoints.py",
           '    if resume_from_checkpoint == "latest":\n        for skipped in list_incomplete_checkpoints',
           '    if resume_from_checkpoint is not None:\n        for skipped in list_incomplete_checkpoints',
           (T_WORKERS_RESUME,)),
    Mutant("all-dropout-keeps-the-caption", "utils/data.py",
           "drop_text = p_image <= u < p_image + p_text + p_all", "drop_text = p_image <= u < p_image + p_text",
           ("tests/test_schedules.py::test_mixed_condition_dropouts_draw_each_case_at_its_rate",)),
    # ---- evaluation options and CLIP-score
    Mutant("eval-vae-path-ignored", "eval/eval.py",
           "        if args.vae_path:\n", "        if False:\n", (T_VAE_DDIM,)),
    Mutant("eval-ddim-ignored", "eval/eval.py",
           "scheduler_class = diffusers.DDIMScheduler if args.ddim else diffusers.UniPCMultistepScheduler",
           "scheduler_class = diffusers.UniPCMultistepScheduler", (T_VAE_DDIM,)),
    Mutant("fid-real-image-path-ignored", "eval/eval_fid.py",
           "    if args.real_image_path:\n        folder", "    if False:\n        folder", (T_REAL_IMAGES,)),
    Mutant("clip-score-of-shuffled-prompts", "eval/eval_clip.py",
           "metric.update(images.to(device), [prompts[p] for p in positions.tolist()])",
           "metric.update(images.to(device), [prompts[-1 - p] for p in positions.tolist()])",
           ("tests/test_eval.py::test_eval_clip_matches_cosine_similarity",)),
    # ---- the paper's protocol by default (the fidelity issue)
    Mutant("ema-first-update-not-zero", "utils/ema.py",
           "return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))",
           "return min(self.decay, (1 + n) / (10 + n))",
           ("tests/test_fidelity.py::test_ema_follows_diffusers_ema_model_update_for_update",),
           "the EMA's first update is not diffusers' (decay 0)"),
    Mutant("canny-training-input-clamped", "reward_models/canny.py",
           "return canny_edges(canny_magnitude(images)).repeat(1, 3, 1, 1)",
           "return canny_edges(canny_magnitude(images)).clamp(0, 1).repeat(1, 3, 1, 1)",
           ("tests/test_fidelity.py::test_canny_training_input_is_the_original_unclamped_magnitude",),
           "the canny ControlNet input is clamped (the original fed it unclamped)"),
    Mutant("reward-stage-crops-instead-of-squashing", "utils/data.py",
           'resize_mode: str = "squash",', 'resize_mode: str = "random_crop",',
           ("tests/test_fidelity.py::test_reward_stage_batch_equals_the_original_squash",),
           "the reward stage keeps the aspect ratio instead of the original's squash"),
    Mutant("paper-ms-ssim-without-border-crop", "utils/metrics.py",
           "    if crop_ssim_border:\n        ssim_map = ssim_map[..., pad:-pad, pad:-pad]",
           "    if False:\n        ssim_map = ssim_map[..., pad:-pad, pad:-pad]",
           ("tests/test_paper_metrics.py::test_paper_ms_ssim_is_torchmetrics_2024_and_corrected_is_todays",),
           "the paper protocol's MS-SSIM is today's torchmetrics, not 2024's"),
    Mutant("lineart-generated-map-not-the-originals", "reward_models/lineart.py",
           "return (255 - (self(images).float() * 255).to(torch.uint8)).repeat(1, 3, 1, 1)",
           "return ((1 - self(images).float()) * 255).to(torch.uint8).repeat(1, 3, 1, 1)",
           ("tests/test_paper_metrics.py::test_lineart_stored_maps_are_the_originals_two_quantisations",),
           "a generated image's line drawing is not stored as the complement of the original's file"),
    Mutant("hed-launcher-warmup-not-effective", "train/reward_hed.sh",
           "paper_args 10000 5", "paper_args 10000 10",
           ("tests/test_fidelity.py::test_launchers_pass_the_originals_effective_warmup",),
           "a launcher passes the original's flag instead of its effective warmup"),
    Mutant("paper-f1-per-image", "eval/eval_edge.py",
           "scores[\"f1\"] = metrics.f1_from_counts_float32(*counts) * 100",
           "scores[\"f1\"] = metrics.binary_f1(flat(pred_edges), flat(target_edges)).view(batch, groups).mean(1) * 100",
           ("tests/test_eval.py::test_eval_edge_canny_scores_match_numpy",),
           "the paper protocol's canny F1 is not pooled per prompt"),
    Mutant("paper-segmentation-at-the-config-scale", "eval/eval_seg.py",
           "paper_prediction = segmenter.predict_mmseg(images, test_scale=PAPER_TEST_SCALE)",
           "paper_prediction = segmenter.predict_mmseg(images)",
           ("tests/test_eval.py::test_eval_seg_paper_protocol_segments_at_the_original_dataloaders_scale",),
           "the paper protocol segments at the config's scale, not the original dataloader's (2048, 512)"),
    # ---- CPO (issue 15)
    Mutant("cpo-reverse-term-weight", "train/reward_control.py",
           "CPO_FORWARD_WEIGHT, CPO_REVERSE_WEIGHT = 0.9, 0.1", "CPO_FORWARD_WEIGHT, CPO_REVERSE_WEIGHT = 0.9, 0.0",
           (T_CPO_LOSS,), "CPO's reverse hinge dropped"),
    Mutant("cpo-weight-not-detached", "train/reward_control.py",
           "return torch.sigmoid(0.5 * beta * (margin_now.detach() - reference_margin))",
           "return torch.sigmoid(0.5 * beta * (margin_now - reference_margin))",
           (T_CPO_LOSS,), "the preference weight back-propagated (CPO detaches it)"),
    Mutant("cpo-mask-includes-t0", "train/reward_control.py",
           "args.beta_dpo, args.margin,\n                    timesteps > 0)", "args.beta_dpo, args.margin,\n                    timesteps >= 0)",
           (T_CPO_STEP_SAME,), "CPO averages over t > 0 only"),
    Mutant("cpo-reference-is-the-trained-model", "train/reward_control.py",
           "reference = copy.deepcopy(controlnet).requires_grad_(False).eval()", "reference = controlnet",
           (T_CPO_STEP,), "the reference must be a frozen copy"),
    Mutant("cpo-reference-without-autocast", "train/reward_control.py",
           "    if weight_dtype != torch.float32:\n        reference.forward = torch.autocast(",
           "    if False:\n        reference.forward = torch.autocast(",
           ("tests/test_cpo.py::test_cpo_under_bf16_the_reference_computes_what_the_trained_copy_computes",),
           "the reference must compute in the trained copy's precision (D = D_ref before the first update)"),
    Mutant("cpo-loser-with-other-noise", "train/reward_control.py",
           "noisy = scheduler.add_noise(latents, noise, timesteps).repeat(2, 1, 1, 1)",
           "noisy = torch.cat([scheduler.add_noise(latents, noise, timesteps), scheduler.add_noise(latents, "
           "torch.randn(latents.shape, generator=generator, dtype=latents.dtype), timesteps)])",
           (T_CPO_SAME,), "winner and loser must share the noise"),
    Mutant("cpo-loser-column-rule", "train/reward_control.py",
           'loser = args.conditioning_image_column.replace("winner", "loser")',
           'loser = args.conditioning_image_column + "_loser"',
           (T_CPO_FLAGS,), "CPO's rule: winner -> loser in the column name"),
    Mutant("cpo-data-loser-is-the-winner", "train/build_cpo_data.py",
           "loser_column: read(condition_path(generations, 0, row))", "loser_column: winner",
           (T_CPO_DATA,), "the loser is the condition of the generation"),
    Mutant("oracle-skips-the-generation-resolution", "eval/eval.py",
           'item["image"].resize((generation_size,) * 2, Image.BICUBIC)', 'item["image"]',
           ("tests/test_eval.py::test_oracle_scores_the_real_images_as_generations",),
           "the oracle's images take the generations' way down and back up"),
    Mutant("two-standard-errors-is-one", "toy/experiment.py",
           "abs(difference) > 2 * error", "abs(difference) > 1 * error",
           ("tests/test_toy_experiment.py::test_differences_over_two_standard_errors_are_marked_in_each_direction",),
           "the table marks differences larger than 2 standard errors"),
    Mutant("standard-error-without-the-reference", "toy/experiment.py",
           "for v in (values, reference) if len(v) > 1)", "for v in (values,) if len(v) > 1)",
           ("tests/test_toy_experiment.py::test_differences_over_two_standard_errors_are_marked_in_each_direction",),
           "Welch's standard error of a difference has both variances"),
    Mutant("restore-ships-no-datasets", "toy/committed.py",
           '        _write_datasets(tmp, manifest["seed"], manifest["rows"])\n', "",
           ("tests/test_toy_committed.py::test_the_bundle_leaves_out_the_datasets_and_restores_the_same_bytes",),
           "a restored world has its datasets"),
    Mutant("restore-trusts-a-damaged-bundle", "toy/committed.py",
           "    sums = check_bundle(bundle)\n", "    sums = _read_sums(bundle)\n",
           ("tests/test_toy_committed.py::test_a_damaged_bundle_is_named_and_nothing_is_written",),
           "every shipped file is checked before a restore writes"),
    Mutant("one-step-estimate-from-the-noise", "train/reward_by_timestep.py",
           "images = decode_x0(parts, prediction.noisy_latents, prediction.model_pred, prediction.timesteps)",
           "images = decode_x0(parts, prediction.noisy_latents, prediction.noise, prediction.timesteps)",
           ("tests/test_reward_by_timestep.py",), "the one-step estimate uses the model's prediction"),
    Mutant("text-encoder-frozen-again", "toy/pretrain.py",
           '            text_encoder.save_pretrained(sd15 / "text_encoder")\n', "",
           ("tests/test_toy_pretrain.py::test_loads_through_the_pipeline_and_the_reward_registry",),
           "the trained text encoder is written"),
]


def tree_files(root: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return sorted({name for name in out.split("\0") if name and (root / name).is_file()})


def copy_tree(root: Path, dest: Path) -> None:
    for name in tree_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    venv = root / ".venv"
    if venv.exists():
        (dest / ".venv").symlink_to(venv.resolve())


def apply(dest: Path, mutant: Mutant) -> str | None:
    """Replace the snippet; an error message when it does not occur exactly once."""
    path = dest / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        return f"the snippet occurs {count} times in {mutant.file} (expected once): update the mutant"
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return None


def session_toy_world() -> Path:
    """This tree's pytest toy world (built if missing), shared by every mutated copy."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    sys.path.insert(0, str(REPO_ROOT))
    import conftest
    from toy.world import make_toy_world

    root = Path(os.environ.get("TOY_WORLD_DIR") or REPO_ROOT / "work_dirs" / f"pytest-toy-{conftest.toy_world_sources_hash()}")
    root.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            make_toy_world(root, seed=conftest.TOY_SEED, rows=conftest.TOY_ROWS)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def run_pytest(tree: Path, tests: list[str], world: Path, timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "TOY_WORLD_DIR": str(world), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [str(tree / ".venv" / "bin" / "python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        return result.returncode, result.stdout + result.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as error:
        return 124, f"timed out after {timeout:.0f} s\n{error.stdout or ''}", time.perf_counter() - start


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # one line per mutant as it finishes, also into a file
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--full", action="store_true", help="run the whole default tier for every mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the listed tests unmutated first")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or any(key in m.name for key in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.name:45s} {m.file:32s} {' '.join(m.tests)}")
        return 0
    if not mutants:
        print("no mutant matches --only", file=sys.stderr)
        return 2
    world = session_toy_world()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tmp = Path(tmp)
        pristine = tmp / "pristine"
        copy_tree(REPO_ROOT, pristine)
        stale = [(m, error) for m in mutants for error in [apply_check(pristine, m)] if error]
        for m, error in stale:
            print(f"STALE     {m.name}: {error}")
        failures += len(stale)
        if not args.no_baseline:
            tests = [] if args.full else sorted({t for m in mutants for t in m.tests})
            rc, output, seconds = run_pytest(pristine, tests, world, args.timeout)
            if rc != 0:
                print(f"BASELINE  the listed tests fail unmutated ({seconds:.0f} s):\n{output[-4000:]}")
                return 1
            print(f"baseline  listed tests pass unmutated ({seconds:.0f} s): {last_line(output)}")
        caught = 0
        runnable = [m for m in mutants if m not in {s for s, _ in stale}]
        for k, mutant in enumerate(runnable):
            work = tmp / f"m{k}"
            shutil.copytree(pristine, work, symlinks=True)
            apply(work, mutant)
            rc, output, seconds = run_pytest(work, [] if args.full else list(mutant.tests), world, args.timeout)
            if rc in (1, 2, 124):  # tests failed, collection/import error, or a hang
                caught += 1
                print(f"caught    {mutant.name} ({seconds:.0f} s): {last_line(output)}")
            else:
                failures += 1
                print(f"SURVIVED  {mutant.name} ({seconds:.0f} s, pytest exit {rc}): {last_line(output)}")
            shutil.rmtree(work, ignore_errors=True)
    print(f"{caught}/{len(mutants)} mutants caught"
          + (f"; {failures} survived or stale" if failures else ""))
    return 1 if failures else 0


def apply_check(tree: Path, mutant: Mutant) -> str | None:
    """Whether the snippet occurs exactly once, without changing the file."""
    path = tree / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.original)
    return None if count == 1 else f"the snippet occurs {count} times in {mutant.file} (expected once): update the mutant"


if __name__ == "__main__":
    sys.exit(main())
