"""The training output folder: kill-safe checkpoint folders, resume, the train log and the final model.

    <output_dir>/training_config.json          every resolved flag (also inside each checkpoint)
    <output_dir>/train_log.jsonl               one JSON line of logged values per optimizer step
    <output_dir>/checkpoint-<N>/               accelerate state (optimizer, lr scheduler, sampler,
                                               RNG states) + controlnet/ + controlnet_ema/ (diffusers
                                               format) + training_config.json
    <output_dir>/.checkpoint-<N>.incomplete/   a checkpoint being written (never resumed from)
    <output_dir>/config.json, *.safetensors    the final ControlNet (ControlNetModel.from_pretrained)
    <output_dir>/controlnet_ema/               its EMA (with --use_ema)

A checkpoint is written into ``.checkpoint-<N>.incomplete/`` and renamed to ``checkpoint-<N>/``
only once every file of every process is in it: a folder under the final name is complete
whatever moment a kill or a full disk struck (a half-written checkpoint used to be taken as
``latest`` and crash the resume). The leading dot keeps it out of ``checkpoint-*`` globs.
One run writes an output folder at a time (``lock_output_dir``, utils/run_lock.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from utils.io import atomic_write, save_json

logger = logging.getLogger("controlnet_pp.train")

CONFIG_FILE = "training_config.json"  # all resolved args, in the output dir and every checkpoint
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON line of logged values per optimizer step, in the output dir
CONTROLNET_SUBFOLDER = "controlnet"  # inside checkpoint-<N>/: training weights, diffusers format
EMA_SUBFOLDER = "controlnet_ema"  # inside checkpoint-<N>/ and output_dir/: EMA weights, diffusers format
INCOMPLETE_SUFFIX = ".incomplete"


def config_dict(args) -> dict:
    """The resolved flags as saved in training_config.json."""
    return {key: value for key, value in sorted(vars(args).items())}


def incomplete_checkpoint_path(output_dir: str | Path, global_step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{global_step}{INCOMPLETE_SUFFIX}"


def checkpoint_step(path: str | Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<N> folders of ``output_dir``, oldest first (complete by construction, see above)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def list_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders whose write was interrupted (kill, full disk); never resumed from."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = r"\.checkpoint-\d+" + re.escape(INCOMPLETE_SUFFIX)
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(pattern, p.name))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Remove what a killed run left half-written: incomplete checkpoints and atomic_write temporaries
    (``.<name>.<random>.tmp``, e.g. of a validation grid). Call it only while holding the run lock:
    then no live process is writing them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for replaced in output_dir.glob(".checkpoint-*.replaced"):  # killed while replacing a checkpoint
        original = output_dir / replaced.name[1:].removesuffix(".replaced")
        if original.exists():
            shutil.rmtree(replaced)
        else:
            os.rename(replaced, original)  # the complete old one is better than none
    for folder in list_incomplete_checkpoints(output_dir):
        logger.info(f"Removing {folder}: a checkpoint write that did not finish (killed, or the disk was full).")
        shutil.rmtree(folder)
    for temporary in output_dir.rglob(".*.tmp"):
        if temporary.is_file():
            temporary.unlink()


def lock_output_dir(accelerator, output_dir: str | Path):
    """The main process takes ``output_dir``'s run lock (utils/run_lock.py) and clears what a killed
    run left half-written; every process raises if another run holds it. Returns the lock (None on
    the other processes)."""
    from accelerate.utils import broadcast_object_list

    from utils.run_lock import RunLock

    lock, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire()
        except (RuntimeError, OSError) as error:
            refusal = [str(error)]
        else:
            if lock.previous:
                logger.warning(f"{output_dir}: the previous run (pid {lock.previous.get('pid')}) ended without "
                               "releasing its lock (killed?); continuing from what it saved.")
            remove_stale_temporaries(output_dir)
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise RuntimeError(refusal[0])
    return lock


def register_checkpoint_hooks(accelerator, args, ema) -> None:
    """Save the ControlNet (and ``ema``, a utils.ema.ModelEMA) in diffusers format inside every
    checkpoint, like diffusers' train_controlnet.py, plus the resolved flags; load them back on resume."""
    from diffusers import ControlNetModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(os.path.join(output_dir, CONTROLNET_SUBFOLDER))
                if ema is not None:
                    ema.save_pretrained(unwrapped, os.path.join(output_dir, EMA_SUBFOLDER))
            save_json(config_dict(args), os.path.join(output_dir, CONFIG_FILE))
        while weights:  # saved above in diffusers format; accelerate must not save them again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            saved = ControlNetModel.from_pretrained(input_dir, subfolder=CONTROLNET_SUBFOLDER)
            model.register_to_config(**saved.config)
            model.load_state_dict(saved.state_dict())
            del saved
        if ema is not None:
            ema.load_pretrained(os.path.join(input_dir, EMA_SUBFOLDER))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, global_step: int, total_limit: int | None = None) -> Path:
    """checkpoint-<step>/ with model, EMA, optimizer, lr scheduler, sampler, RNG states and config.

    Written into ``.checkpoint-<step>.incomplete/`` by every process, renamed by the main process
    once all have finished; only then are old checkpoints removed beyond ``total_limit``
    (--checkpoints_total_limit; removing them first left nothing to resume from when the write
    was killed).
    """
    output_dir = Path(output_dir)
    path, partial = output_dir / f"checkpoint-{global_step}", incomplete_checkpoint_path(output_dir, global_step)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except OSError as error:
        raise OSError(error.errno, f"writing checkpoint-{global_step} into {partial} failed ({error}); the "
                                   f"checkpoints already in {output_dir} are intact and the next run with "
                                   f"--resume_from_checkpoint latest continues from the newest of them "
                                   f"(free some space first if the disk is full).") from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():  # the same step saved by an earlier attempt: replace it, never merge into it
            stale = output_dir / f".checkpoint-{global_step}.replaced"
            if stale.exists():
                shutil.rmtree(stale)
            os.rename(path, stale)
            os.rename(partial, path)
            shutil.rmtree(stale)
        else:
            os.rename(partial, path)
        if total_limit is not None:
            existing = list_checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - total_limit)]:
                logger.info(f"Removing {old} (--checkpoints_total_limit {total_limit}).")
                # Renamed out of the checkpoint-<N> namespace first: a kill during the removal
                # leaves a hidden folder, never a half-deleted checkpoint-<N> taken as latest.
                doomed = output_dir / f".{old.name}{INCOMPLETE_SUFFIX}"
                os.rename(old, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    logger.info(f"Saved {path}")
    return path


def resolve_resume_path(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint folder --resume_from_checkpoint names (a path, a folder inside ``output_dir``,
    or 'latest'); None when 'latest' finds none (a fresh start)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for skipped in list_incomplete_checkpoints(output_dir):
            logger.warning(f"Skipping {skipped}: its write did not finish (the run was killed or the disk was full).")
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist.")
    return path


# Data settings a run must keep when it resumes, with the value a checkpoint written before the
# setting existed was made with (the data geometry became the original's: issue "Faithful by default").
RESUMED_DATA_SETTINGS = {"resize_mode": "random_crop", "resize_interpolation": "bicubic",
                         "palette_labels": "map_then_resize"}


def check_resumed_data_settings(args, resume_path: Path) -> None:
    """Refuse to continue a checkpoint with other data settings than it was trained with (a run
    started before the defaults became the original's would silently switch its geometry)."""
    config_file = Path(resume_path) / CONFIG_FILE
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text())
    changed = [(name, saved.get(name, old_default), getattr(args, name)) for name, old_default in
               RESUMED_DATA_SETTINGS.items()
               if hasattr(args, name) and saved.get(name, old_default) != getattr(args, name)]
    if changed:
        flags = " ".join(f"--{name} {before}" for name, before, _ in changed)
        details = ", ".join(f"--{name} {before} there, {now} now" for name, before, now in changed)
        raise ValueError(f"{resume_path} was trained with other data settings ({details}). Pass {flags} to continue "
                         "it as it was, or start a new --output_dir.")


def truncate_train_log(output_dir: str | Path, global_step: int) -> None:
    """Keep the train_log.jsonl lines of steps <= ``global_step`` (where training resumes): a killed
    run logged steps after its last checkpoint that the resumed run logs again."""
    log = Path(output_dir) / TRAIN_LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= global_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write(log, lambda tmp: Path(tmp).write_text("".join(kept)))


def append_train_log(output_dir: str | Path, logs: dict) -> None:
    """One JSON line of an optimizer step's logged values (with its "step"), for scripts and plots."""
    with open(Path(output_dir) / TRAIN_LOG_FILE, "a") as log_file:
        log_file.write(json.dumps(logs) + "\n")


def save_final_model(unwrapped, ema, output_dir: str | Path) -> None:
    """The ControlNet in diffusers format in ``output_dir`` (and the EMA in controlnet_ema/), each
    file written whole into a temporary folder and moved into place, so a kill leaves either the
    previous file or the new one, never a truncated one."""
    output_dir = Path(output_dir)
    staging = output_dir / f".final{INCOMPLETE_SUFFIX}"
    if staging.exists():
        shutil.rmtree(staging)
    unwrapped.save_pretrained(staging)
    if ema is not None:
        ema.save_pretrained(unwrapped, staging / EMA_SUBFOLDER)
    for source in sorted(staging.rglob("*"), key=lambda p: len(p.parts)):
        if source.is_file():
            target = output_dir / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(staging)
