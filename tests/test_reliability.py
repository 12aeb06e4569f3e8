"""Kill-safety and one writer per output folder (docs/RELIABILITY.md).

A preemptible cluster requeues a killed job by running the same command again. These tests kill
a short toy run (4 steps, a checkpoint every 2, --checkpoints_total_limit 1, EMA, validation at
step 3) at many moments, among them inside every file of a checkpoint write, re-run the same
command each time, and check that the run ends bit-identical to one that was never interrupted.

The kills are real (``os._exit`` in a forked child, no cleanup runs). Product code has no test
hooks: a driver process imports the training script once and, per attempt, forks a child that
patches the function writing the file of interest (torch.save, safetensors' save_file,
save_json, os.rename, ...) so that it writes part of the file and dies at the chosen moment.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, REPO_ROOT
from test_train_e2e import assert_same_weights
from test_train_step import load_entry, toy_flags

KILLED = 137  # the exit status the child uses for "killed here" (as SIGKILL's 128 + 9 in a shell)

# Every attempt is the same command: what a requeue runs again.
RUN_FLAGS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
             "--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-3", "--max_timestep_rewarding", "500",
             "--validation_steps", "3", "--num_validation_rows", "1", "--num_validation_images", "1",
             "--num_validation_inference_steps", "2", "--resume_from_checkpoint", "latest"]

# The moments of the chain, in the order a run reaches them (each attempt resumes from what the
# previous one left). file:<step>:<name> dies half-way through writing that file of checkpoint-<step>.
KILL_MOMENTS = [
    "file:2:controlnet",  # the ControlNet weights (safetensors) inside the checkpoint
    "file:2:controlnet_ema",  # the EMA weights
    "file:2:training_config.json",
    "file:2:optimizer.bin",  # 0-byte / truncated optimizer.bin crashed the resume with a bare EOFError
    "file:2:scheduler.bin",
    "file:2:random_states_0.pkl",
    "step:3",  # inside the optimizer step after a complete checkpoint
    "validation:3",  # while writing a validation grid (a temporary file stays behind)
    "rename:4",  # every file of checkpoint-4 written, not yet renamed into place
    "prune:4",  # checkpoint-4 complete, checkpoint-2 half-removed by --checkpoints_total_limit
    "final",  # half-way through the final ControlNet in --output_dir
]

DRIVER = r'''
import json, os, re, shutil, sys, tempfile, traceback
from pathlib import Path

repo, plan_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
plan = json.loads(Path(plan_file).read_text())
import safetensors.torch, torch
from train import reward_control as script, validation
from utils import checkpoints as checkpointing


def install(moment, fired):
    kind, _, rest = moment.partition(":")

    def die():
        Path(fired).write_text(moment)
        os._exit(137)

    def half(path):  # what a kill half-way through a write leaves
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    if kind == "file":
        step, name = rest.split(":")
        folder = f".checkpoint-{step}.incomplete"

        def hit(path):
            path = Path(path)
            return folder in path.parts and (path.name == name or path.parent.name == name)

        real_torch_save, real_save_file, real_save_json = torch.save, safetensors.torch.save_file, checkpointing.save_json

        def torch_save(obj, f, *a, **k):
            real_torch_save(obj, f, *a, **k)
            if isinstance(f, (str, os.PathLike)) and hit(f):
                half(f); die()

        def save_file(tensors, filename, *a, **k):
            real_save_file(tensors, filename, *a, **k)
            if hit(filename):
                half(filename); die()

        def save_json(obj, path):
            if hit(path):  # atomic_write's temporary, cut short
                fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
                os.write(fd, b'{"trunc'); die()
            return real_save_json(obj, path)

        torch.save, safetensors.torch.save_file, checkpointing.save_json = torch_save, save_file, save_json
    elif kind == "step":
        real_step = script.training_step

        def training_step(*a, global_step=None, **k):
            out = real_step(*a, global_step=global_step, **k)
            if global_step == int(rest) - 1:
                die()
            return out

        script.training_step = training_step
    elif kind == "validation":
        real_save_image = validation.save_image

        def save_image(image, path):
            if f"step-{rest}" in str(path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
                os.write(fd, b"\x89PNG"); die()
            return real_save_image(image, path)

        validation.save_image = save_image
    elif kind in ("rename", "prune"):
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            src, dst = Path(src), Path(dst)
            if kind == "rename" and src.name == f".checkpoint-{rest}.incomplete":
                die()
            real_rename(src, dst, *a, **k)
            if kind == "prune" and re.fullmatch(r"checkpoint-\d+", src.name) and dst.name.endswith(".incomplete"):
                next(p for p in dst.rglob("*") if p.is_file()).unlink()  # rmtree under way
                die()

        os.rename = rename
    elif kind == "final":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *a, **k):
            real_save_file(tensors, filename, *a, **k)
            if ".final.incomplete" in Path(filename).parts:
                half(filename); die()

        safetensors.torch.save_file = save_file
    else:
        raise ValueError(moment)


results = []
for attempt in plan["attempts"]:
    fired = attempt["fired"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if attempt["moment"]:
                install(attempt["moment"], fired)
            script.main(script.parse_args(attempt["flags"]))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out = Path(attempt["flags"][attempt["flags"].index("--output_dir") + 1])
    checkpoints = {p.name: [f for f in plan["checkpoint_files"] if not (p / f).is_file()]  # missing files
                   for p in sorted(out.glob("checkpoint-*"))}
    results.append({"moment": attempt["moment"], "exit": os.waitstatus_to_exitcode(status),
                    "fired": Path(fired).read_text() if Path(fired).exists() else None, "checkpoints": checkpoints})
print("RESULTS " + json.dumps(results))
'''


def run_attempts(tmp_path: Path, attempts: list[tuple[str | None, list[str]]]) -> list[dict]:
    """Run each (moment, flags) in a fresh forked process of one driver; their exit codes."""
    plan = {"attempts": [{"moment": moment, "flags": flags, "fired": str(tmp_path / f"fired-{k}")}
                         for k, (moment, flags) in enumerate(attempts)], "checkpoint_files": CHECKPOINT_FILES}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONHASHSEED": "0"}
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(REPO_ROOT), str(tmp_path / "plan.json")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, f"driver failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
    return json.loads(lines[-1][len("RESULTS "):]), result.stderr


CHECKPOINT_FILES = ("controlnet/diffusion_pytorch_model.safetensors", "controlnet/config.json",
                    "controlnet_ema/diffusion_pytorch_model.safetensors", "controlnet_ema/ema_state.json",
                    "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_config.json")


def assert_complete_checkpoints(out: Path, reference: Path) -> list[str]:
    """Every checkpoint-<N> folder holds every file, each as long as in the uninterrupted run's."""
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    for name in names:
        for file in CHECKPOINT_FILES:
            path = out / name / file
            assert path.is_file(), f"{path} missing: an incomplete checkpoint carries the final name"
            if file.endswith((".safetensors", ".bin")):
                assert path.stat().st_size == (reference / "checkpoint-4" / file).stat().st_size, path
    return names


def log_steps(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("step_time")
    return lines


def test_kills_at_every_moment_of_a_run_end_bit_identical_with_the_same_command(toy_world, tmp_path):
    whole, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    flags = {out: toy_flags(toy_world, "canny", out, *RUN_FLAGS) for out in (whole, killed)}
    attempts = [(None, flags[whole])] + [(moment, flags[killed]) for moment in KILL_MOMENTS] + [(None, flags[killed])]
    results, stderr = run_attempts(tmp_path, attempts)

    assert results[0]["exit"] == 0, stderr[-5000:]
    for result in results[1:-1]:  # each kill happened where it was meant to, and nowhere else
        assert (result["exit"], result["fired"]) == (137, result["moment"]), (result, stderr[-8000:])
        # What the kill left: only complete checkpoints, and (limit 1) never none once one was written.
        assert all(missing == [] for missing in result["checkpoints"].values()), result
        if not result["moment"].startswith("file:2:"):
            assert result["checkpoints"], f"{result['moment']}: no checkpoint left to resume from"
    assert results[-1]["exit"] == 0, stderr[-8000:]
    # Each re-run said where it resumed from and what it skipped.
    assert stderr.count("Removing") >= 1 and "a checkpoint write that did not finish" in stderr

    # Bit-identical to the uninterrupted run: final weights, EMA, the kept checkpoint, the log.
    assert assert_complete_checkpoints(killed, whole) == ["checkpoint-4"] == assert_complete_checkpoints(whole, whole)
    assert_same_weights(whole, killed)
    assert_same_weights(whole / "controlnet_ema", killed / "controlnet_ema")
    assert_same_weights(whole / "checkpoint-4" / "controlnet", killed / "checkpoint-4" / "controlnet")
    assert_same_weights(whole / "checkpoint-4" / "controlnet_ema", killed / "checkpoint-4" / "controlnet_ema")
    a, b = (torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=False) for out in (whole, killed))
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():  # Adam's moments and step count
        assert all(torch.equal(state[key], b["state"][index][key]) for key in state), index
    a, b = (torch.load(out / "checkpoint-4" / "scheduler.bin", weights_only=False) for out in (whole, killed))
    assert a == b
    # One line per step, no step logged twice (a kill after step 3 used to leave it in the log).
    assert [line["step"] for line in log_steps(killed)] == [1, 2, 3, 4]
    assert log_steps(killed) == log_steps(whole)
    config = json.loads((killed / "training_config.json").read_text())
    reference = json.loads((whole / "training_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "output_dir"} == \
        {k: v for k, v in reference.items() if k != "output_dir"}
    # Nothing half-written stays behind: no temporaries, no incomplete folders, the lock released.
    leftovers = [p.relative_to(killed) for p in killed.rglob(".*") if p.name != ".run.lock"]
    assert leftovers == []
    assert (killed / ".run.lock").read_text() == ""


def test_latest_skips_incomplete_checkpoints_and_says_so(tmp_path, caplog):
    """Unit: only renamed folders are checkpoints; an interrupted write is named and skipped."""
    from utils.checkpoints import resolve_resume_path

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".checkpoint-4.incomplete").mkdir()
    (tmp_path / "checkpoint-3.tmp").mkdir()  # not ours: ignored
    with caplog.at_level("WARNING", logger="controlnet_pp.train"):
        assert resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert f"Skipping {tmp_path / '.checkpoint-4.incomplete'}: its write did not finish" in caplog.text


def test_ema_folder_without_weights_is_called_incomplete_not_saved_without_ema(tmp_path):
    """A full disk during the EMA write used to be reported as 'saved without --use_ema'."""
    from utils.ema import ModelEMA

    ema = ModelEMA(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="saved without --use_ema"):
        ema.load_pretrained(tmp_path / "controlnet_ema")
    (tmp_path / "controlnet_ema").mkdir()
    with pytest.raises(FileNotFoundError, match=r"the checkpoint is incomplete \(its write was interrupted\)"):
        ema.load_pretrained(tmp_path / "controlnet_ema")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_what_to_do(toy_world, tmp_path,
                                                                                    monkeypatch):
    """ENOSPC while writing checkpoint-4 (simulated in torch.save): the error names the checkpoint
    and the cause; checkpoint-2 stays, and the same command afterwards ends like an uninterrupted run."""
    import errno

    from accelerate.state import AcceleratorState, GradientState

    script = load_entry("reward_control")
    out = tmp_path / "out"
    flags = toy_flags(toy_world, "canny", out, *RUN_FLAGS, "--validation_steps", "100")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if ".checkpoint-4.incomplete" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(OSError, match=r"writing checkpoint-4 into .*\.checkpoint-4\.incomplete failed \(.*No space "
                                      r"left on device.*\); the checkpoints already in .* are intact"):
        script.main(script.parse_args(flags))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / ".run.lock").read_text() == ""  # released on the way out

    monkeypatch.setattr(torch, "save", real_save)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    script.main(script.parse_args(flags))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / ".checkpoint-4.incomplete").exists()
    assert [line["step"] for line in log_steps(out)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------------------


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock (as a first run would)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from utils.run_lock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), str(REPO_ROOT)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_busy_output_dir_refuses_naming_the_first(toy_world, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        script = load_entry("reward_control")
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with pytest.raises(RuntimeError, match=rf"--output_dir {out} is in use by another run \(pid {holder.pid} on "
                                               r".*\); two runs on one folder would overwrite"):
            script.main(script.parse_args(toy_flags(toy_world, "canny", out, "--max_train_steps", "1")))
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"], "the refused run wrote into the folder"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_recognised_as_stale(tmp_path):
    from utils.run_lock import RunLock

    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel released the dead run's lock
    try:
        assert lock.previous["pid"] == holder.pid
        assert json.loads((tmp_path / ".run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / ".run.lock").read_text() == ""


def test_a_failing_rerun_leaves_the_finished_runs_config_alone(toy_world, tmp_path):
    """The config is written once the run is about to train: a re-run that fails on a bad
    --validation_image (after the models loaded) must not rewrite it."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "out"
    out.mkdir()
    (out / "training_config.json").write_text('{"finished": true}\n')
    script = load_entry("reward_control")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    args = script.parse_args(toy_flags(toy_world, "canny", out, "--max_train_steps", "1", "--validation_prompt", "x",
                                       "--validation_image", str(tmp_path / "broken.png")))
    with pytest.raises(ValueError, match="--validation_image .*broken.png: cannot read it"):
        script.main(args)
    assert (out / "training_config.json").read_text() == '{"finished": true}\n'
