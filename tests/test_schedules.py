"""The training loop's optimisation and data plumbing, from runs of the real script (in-process).

- gradient clipping: the gradients the optimizer steps with are the accumulated gradients scaled
  by max_norm / (||g|| + 1e-6) (torch.nn.utils.clip_grad_norm_'s rule, written out here);
- --scale_lr and constant_with_warmup: the lr of each step worked out by hand (one process here;
  the per-process factor of the warmup is checked by the 2-process run in test_train_e2e.py);
- data loading with worker processes (as the launchers run it) gives the same training as
  loading in the main process, across epochs and with per-row randomness (condition dropout);
- an explicit --resume_from_checkpoint path (not 'latest') resumes from that checkpoint.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_train_e2e import fresh_accelerate_state, load_weights  # noqa: F401 (fixture)
from test_train_step import load_entry, toy_flags

QUIET = ["--validation_steps", "100", "--checkpointing_steps", "100", "--report_to", "none"]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_clipping_warmup_and_scale_lr(toy_world, tmp_path, fresh_accelerate_state, monkeypatch):
    from train import reward_control

    records = []
    real_build_optimizer = reward_control.build_optimizer

    def recording_optimizer(args, params):
        params = list(params)
        optimizer = real_build_optimizer(args, params)
        accumulated = {}
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: accumulated.__setitem__(p, p.grad.detach().clone()))

        class Recording(type(optimizer)):  # a subclass: lr schedulers wrap the bound step method
            def step(self, *a, **k):
                records.append({"lr": self.param_groups[0]["lr"],
                                "before": [accumulated[p] for p in params if p in accumulated],
                                "after": [p.grad.detach().clone() for p in params if p in accumulated]})
                return super().step(*a, **k)

        optimizer.__class__ = Recording
        return optimizer

    monkeypatch.setattr(reward_control, "build_optimizer", recording_optimizer)
    script = load_entry("reward_control")
    out = tmp_path / "out"
    max_norm = 1e-3  # far below the toy gradients' norm: clipping is active
    script.main(script.parse_args(toy_flags(
        toy_world, "canny", out, "--max_train_steps", "3", "--gradient_accumulation_steps", "2", "--scale_lr",
        "--learning_rate", "1e-4", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
        "--max_grad_norm", str(max_norm), "--max_train_samples", "12", *QUIET)))

    # --scale_lr: lr x accumulation (2) x batch per process (2) x processes (1).
    base = 1e-4 * 2 * 2 * 1
    # constant_with_warmup over 2 steps: the k-th optimizer step (from 0) uses base * min(1, k / 2).
    assert [r["lr"] for r in records] == pytest.approx([0.0, base / 2, base])
    assert [line["lr"] for line in _log(out)] == pytest.approx([base / 2, base, base])  # after each step
    assert json.loads((out / "training_config.json").read_text())["learning_rate"] == pytest.approx(base)
    for record in records:
        before = torch.cat([g.double().flatten() for g in record["before"]])
        after = torch.cat([g.double().flatten() for g in record["after"]])
        norm = before.norm().item()
        assert norm > 10 * max_norm
        torch.testing.assert_close(after, before * (max_norm / (norm + 1e-6)), rtol=1e-5, atol=1e-12)
        assert after.norm().item() == pytest.approx(max_norm, rel=1e-3)


def _run(world, out, *extra):
    script = load_entry("reward_control")
    # 4 rows, batch 2: two optimizer steps per epoch, so 4 steps cross into a second epoch; text
    # condition dropouts make every row's transform depend on the epoch.
    flags = toy_flags(world, "canny", out, "--max_train_samples", "4", "--image_condition_dropout", "0.25",
                      "--text_condition_dropout", "0.25", "--all_condition_dropout", "0.25",
                      "--learning_rate", "1e-3", "--max_timestep_rewarding", "500", *QUIET, *extra)
    args = script.parse_args(flags)
    script.main(args)
    return out


def test_worker_processes_and_an_explicit_resume_path_train_like_the_plain_run(toy_world, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    def fresh():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    fresh()
    plain = _run(toy_world, tmp_path / "plain", "--max_train_steps", "4", "--checkpointing_steps", "2")
    fresh()
    workers = _run(toy_world, tmp_path / "workers", "--max_train_steps", "4", "--dataloader_num_workers", "2")
    fresh()
    # Into another folder (where 'latest' would find nothing), from the plain run's checkpoint-2.
    resumed = _run(toy_world, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint",
                   str(plain / "checkpoint-2"))
    fresh()
    initial, final = load_weights(toy_world / "toy-controlnet"), load_weights(plain)
    assert any(not torch.equal(initial[k], final[k]) for k in initial)
    for other in (workers, resumed):
        other_weights = load_weights(other)
        different = [k for k in final if not torch.equal(final[k], other_weights[k])]
        assert not different, f"{other.name}: {len(different)} tensors differ from the plain run, e.g. {different[:2]}"
    assert [line["step"] for line in _log(resumed)] == [3, 4]
    assert [line["loss"] for line in _log(resumed)] == [line["loss"] for line in _log(plain)][2:]


def test_mixed_condition_dropouts_draw_each_case_at_its_rate(toy_world):
    """image 0.2, text 0.3, both 0.1 at once: one draw per row picks at most one case, each at
    its own rate (binomial standard error at 600 draws: < 0.02; the bound is 3.5 of them)."""
    from transformers import CLIPTokenizer

    from test_train_data import make_dataset, rows_of

    tokenizer = CLIPTokenizer.from_pretrained(toy_world / "toy-sd15", subfolder="tokenizer")
    empty = tokenizer("", max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
    rows = rows_of(make_dataset(["a red circle"] * 5), tokenizer, image_condition_dropout=0.2,
                   text_condition_dropout=0.3, all_condition_dropout=0.1)
    counts = {"image": 0, "text": 0, "both": 0, "none": 0}
    draws = 0
    for epoch in range(120):
        rows.set_epoch(epoch)
        for index in range(len(rows)):
            row = rows[index]
            image, text = bool(row["drop_condition"]), torch.equal(row["input_ids"], empty)
            counts["both" if image and text else "image" if image else "text" if text else "none"] += 1
            draws += 1
    rates = {case: count / draws for case, count in counts.items()}
    expected = {"image": 0.2, "text": 0.3, "both": 0.1, "none": 0.4}
    for case, rate in expected.items():
        assert abs(rates[case] - rate) < 0.07, (case, rates)
