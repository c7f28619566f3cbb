"""Two runs on one run directory: the second waits or fails with a clear message, never mixes outputs."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from storage.errors import BrvoError
from storage.locking import lock_holder, run_dir_lock


# ---- run-directory lock across processes -----------------------------------------------------
# Signalling by marker files, not mp.Event: a process killed while waiting on an Event leaves its
# condition variable broken, and the next set() would hang.

def _hold_lock(run_dir: str, marker: str, release: str) -> None:
    with run_dir_lock(run_dir, timeout_s=5):
        open(marker, "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)


def _start_holder(tmp_path):
    run_dir, marker, release = tmp_path / "run", tmp_path / "held", tmp_path / "release"
    proc = mp.get_context("spawn").Process(target=_hold_lock, args=(str(run_dir), str(marker), str(release)))
    proc.start()
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.02)
    return proc, run_dir, release


def test_run_dir_lock_excludes_other_process_and_dies_with_it(tmp_path):
    proc, run_dir, release = _start_holder(tmp_path)
    try:
        assert lock_holder(run_dir) == str(proc.pid)
        t0 = time.monotonic()
        with pytest.raises(BrvoError, match=rf"in use by another run \(pid {proc.pid}\); wait for it"):
            with run_dir_lock(run_dir, timeout_s=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 5
        proc.kill()  # a killed holder must not leave a stale lock
        proc.join(10)
        with run_dir_lock(run_dir, timeout_s=5):
            assert lock_holder(run_dir) == str(os.getpid())
        assert lock_holder(run_dir) is None
    finally:
        release.touch()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_run_dir_lock_waits_for_release(tmp_path):
    proc, run_dir, release = _start_holder(tmp_path)
    try:
        # the holder finishes after ~0.5 s: a run that waits gets the lock then, not before
        threading.Timer(0.5, release.touch).start()
        t0 = time.monotonic()
        with run_dir_lock(run_dir, timeout_s=10):
            assert time.monotonic() - t0 >= 0.45
            assert lock_holder(run_dir) == str(os.getpid())
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_second_augment_on_busy_run_dir_fails_clearly_and_writes_nothing(tmp_path):
    """The augment chain takes the run-directory lock before it writes anything."""
    from flows.augment import augment_chain
    from tasks.config import preset

    proc, run_dir, release = _start_holder(tmp_path)
    try:
        (run_dir / "augmented.h5").write_bytes(b"the first run's output")
        before = sorted(p.name for p in run_dir.iterdir())
        with pytest.raises(BrvoError, match=rf"run directory .* is in use by another run \(pid {proc.pid}\)"):
            augment_chain(tmp_path / "soul", run_dir, preset("tiny"), lock_wait_s=0.3)
        assert sorted(p.name for p in run_dir.iterdir()) == before
        assert (run_dir / "augmented.h5").read_bytes() == b"the first run's output"
    finally:
        release.touch()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
