"""Exclusive locks on run directories and the model registry (``fcntl.flock``).

Two runs writing into the same run directory would mix their outputs, so a run
holds ``RUN_DIR/.lock`` while it works; a second run waits up to a timeout and
then fails with a one-line message naming the holder's pid. ``flock`` locks
belong to the open file, so the kernel releases them when the holder exits or is
killed: a crashed run never leaves a stale lock behind. The lock file itself is
never deleted (deleting a flock'd file lets two processes lock two different
files of the same name).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from storage.errors import BrvoError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, timeout_s: float, busy: str, poll_s: float = 0.1) -> Iterator[Path]:
    """Hold an exclusive flock on ``lock_path``; wait at most ``timeout_s`` seconds.

    ``busy`` is the error message on timeout; ``{pid}`` in it is replaced by the
    holder's pid (read from the lock file, '?' when unknown).
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BrvoError(busy.replace("{pid}", _holder_pid(lock_path))) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={time.time():.0f}\n".encode(), 0)
        try:
            yield lock_path
        finally:
            # Clear the holder info while still holding the lock, then release it.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, timeout_s: float = 0.0) -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` for the duration of a run (creates RUN_DIR if needed).

    Raises :class:`BrvoError` ``run directory X is in use by another run (pid N); ...``
    when another process still holds it after ``timeout_s`` seconds.
    """
    run_dir = Path(run_dir)
    busy = f"run directory {run_dir} is in use by another run (pid {{pid}}); wait for it or use another run_dir"
    with file_lock(run_dir / LOCK_NAME, timeout_s, busy) as path:
        yield path


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """The pid recorded in RUN_DIR/.lock if some process holds it now, else None (for status messages)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder_pid(lock_path: Path) -> str:
    try:
        text = lock_path.read_text()
    except OSError:
        return "?"
    for field in text.split():
        if field.startswith("pid="):
            return field[4:]
    return "?"
