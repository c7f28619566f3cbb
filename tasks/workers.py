"""Process pools for CPU-bound steps (JPEG decoding, phantom rendering).

'fork' where available: workers need no re-import of Prefect (about 1.3 s each) and no
``if __name__ == '__main__'`` guard in a user's script. But a child forked inside a Prefect
flow inherits Prefect's SIGTERM handler, and ``Pool.terminate()`` then hangs joining a
child that tries to report a crash to the API instead of dying. :func:`reset_signals`
runs first in every worker and restores the default handlers.
"""
from __future__ import annotations

import multiprocessing as mp
import signal


def reset_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def worker_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0])
