"""Process pools for CPU-bound steps (JPEG decoding, phantom rendering).

'fork' where available: workers need no re-import of Prefect (about 1.3 s each) and no
``if __name__ == '__main__'`` guard in a user's script. But a child forked inside a Prefect
flow inherits Prefect's SIGTERM handler, and ``Pool.terminate()`` then hangs joining a
child that tries to report a crash to the API instead of dying. :func:`reset_signals`
runs first in every worker and restores the default handlers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator


def reset_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def worker_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0])


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def process_map(workers: int | None = None) -> Iterator[Callable]:
    """A ``map(fn, items)`` that runs on ``workers`` processes (default: :func:`available_cpus`), in order.

    The builtin ``map`` when there is one worker. ``fn`` must be a module-level function; workers
    start with :func:`reset_signals`, from :func:`worker_context`.
    """
    workers = available_cpus() if workers is None else max(1, int(workers))
    if workers == 1:
        yield map
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=reset_signals) as pool:
        yield pool.map
