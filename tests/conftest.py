"""Shared fixtures: the toy world (generated once, cached between sessions) and an entry-point runner.

The toy world is cached in ``work_dirs/pytest-toy-<hash>`` where the hash covers the sources
that generate it (toy/*.py, utils/tokenizer.py, reward_models/*.py), so editing a generator
rebuilds it and an unchanged tree reuses it (10-30 s saved per session). Set
``TOY_WORLD_DIR`` to use another folder. A file lock makes parallel sessions wait for one
generator instead of racing; ``make_toy_world`` also renames atomically.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # tests import utils / reward_models like entry points do
    sys.path.insert(0, str(REPO_ROOT))

TOY_SEED = 0
# Rows per split: enough for 2-process evaluation and a few batches of 4, small enough to build
# in seconds.
TOY_ROWS = 24
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def toy_world_sources_hash() -> str:
    """Hash of every source file the toy world is generated from."""
    sources = [REPO_ROOT / "toy" / "world.py", REPO_ROOT / "toy" / "reward_checkpoints.py",
               REPO_ROOT / "utils" / "tokenizer.py", *sorted((REPO_ROOT / "reward_models").glob("*.py"))]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(f"seed={TOY_SEED} rows={TOY_ROWS}".encode())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """Path of a toy world (seed 0, 24 rows per split), see ``toy/world.py``."""
    from toy.world import make_toy_world

    folder = os.environ.get("TOY_WORLD_DIR")
    root = Path(folder) if folder else REPO_ROOT / "work_dirs" / f"pytest-toy-{toy_world_sources_hash()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session generating the same world: wait for it
        try:
            make_toy_world(root, seed=TOY_SEED, rows=TOY_ROWS)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


@pytest.fixture(scope="session")
def toy_manifest(toy_world: Path) -> dict:
    """The toy world's manifest, with absolute paths (``make_toy_world`` returns it quickly)."""
    from toy.world import make_toy_world

    return make_toy_world(toy_world, seed=TOY_SEED, rows=TOY_ROWS)


def run_entry(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repo root with the venv's python, offline.

    ``args`` starts with a script path or ``-m module`` (e.g. ``["eval/eval.py", "--help"]``);
    a leading ``accelerate`` runs the venv's accelerate launcher instead of python. On a
    non-zero exit the assertion message carries the command, stdout and stderr.

    OMP_NUM_THREADS defaults to 1: on a machine whose cores are all busy (the test suite shares
    2 cores), OpenMP threads waiting for each other made the toy UNet ~10x slower than one thread.
    """
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONHASHSEED": "0", **(env or {})}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if args and args[0] == "accelerate":
        command = [str(Path(sys.executable).with_name("accelerate")), *args[1:]]
    else:
        command = [sys.executable, *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"command failed with exit code {result.returncode}: {' '.join(command)}\n"
        f"--- stdout ---\n{result.stdout[-10000:]}\n--- stderr ---\n{result.stderr[-10000:]}"
    )
    return result


@pytest.fixture(scope="session")
def run_entry_point():
    """Fixture form of ``run_entry`` for tests that prefer fixtures to imports."""
    return run_entry


@pytest.fixture(scope="session")
def pretrained(toy_world, tmp_path_factory) -> tuple[Path, dict]:
    """The toy world pretrained with ``--budget small`` (about a minute), once per session: its
    tests (test_toy_pretrain.py) and the shipped-bundle tests (test_toy_committed.py) share it."""
    import toy.pretrain

    out = tmp_path_factory.mktemp("pretrain") / "world"
    manifest = toy.pretrain.main(["--toy", str(toy_world), "--out", str(out), "--seed", "0", "--budget", "small"])
    return out, manifest
