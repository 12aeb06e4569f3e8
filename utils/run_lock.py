"""One writer per output folder: a lock file that a second run refuses with a message naming the first.

A preemptible cluster requeues a job by running the same command again; if the first attempt is
still alive (or a user starts a second run on the same --output_dir by mistake), both would
write the same checkpoints and logs and the first run's results would vanish without a word.

The lock is ``fcntl.flock`` on ``<output_dir>/.run.lock``: the kernel releases it when the
process dies, however it dies (SIGKILL included), so a lock left by a dead run is recognised
as stale without guessing from pids. The file also records who holds it (pid, host, start time,
command) so that the refusal can name the run in the way.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".run.lock"


class OutputDirBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


class RunLock:
    """Hold ``<folder>/.run.lock`` until ``release()`` or the end of the process."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self._file = None
        self.previous: dict | None = None  # the holder's record left by a run that died, if any

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(self.path)
            handle.close()
            raise OutputDirBusy(
                f"{self.flag} {self.folder} is in use by another run ({describe(holder)}); two runs on one folder "
                f"would overwrite each other's checkpoints and logs. Wait for it to end, stop it, or pass another "
                f"{self.flag}."
            ) from None
        self.previous = _read_record(self.path) or None  # written by a run that died without releasing
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # an empty file: nobody holds it
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_record(path: Path) -> dict:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe(record: dict) -> str:
    if not record:
        return "a process that has not written its details yet"
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
            f"{record.get('command')}")
