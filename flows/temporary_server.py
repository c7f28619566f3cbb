"""The CLI's temporary Prefect server dies with the CLI, however the CLI ends.

Without PREFECT_API_URL, Prefect starts a temporary API server (uvicorn, about 230 MB and a loopback
port) in a subprocess on first use and stops it at interpreter exit. ``kill -9`` skips that exit, and
SIGKILL cannot be trapped, so the server must notice its parent's death by itself. Linux's parent-death
signal does exactly that: the server is started with ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, and the kernel
sends it SIGTERM (a graceful uvicorn shutdown) when its parent goes, for any reason. That needs no code
inside the server and no extra watchdog process (which could itself be orphaned).

The kernel's "parent" is the *thread* that forked the child: a server forked by a short-lived worker
thread would die with that thread, mid-run. So the fork is made by a thread that lives as long as the
process. Elsewhere than Linux, the server is Prefect's own, unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from functools import lru_cache
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when its parent dies (even by SIGKILL)."""
    libc = _libc()
    assert libc is not None, "the parent-death signal needs Linux"

    def arm() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def popen_from_a_lasting_thread(start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    """Run ``start`` (which forks) on a daemon thread that then waits until the process exits, so a
    parent-death signal fires when the process dies, not when the calling thread ends."""
    outcome: dict[str, Any] = {}
    forked = threading.Event()

    def fork_and_stay() -> None:
        try:
            outcome["process"] = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc
        forked.set()
        threading.Event().wait()  # never set: this thread stays the child's parent until the process exits

    threading.Thread(target=fork_and_stay, name="temporary-prefect-server-parent", daemon=True).start()
    forked.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["process"]


@lru_cache(maxsize=1)
def _server_class() -> type:
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ServerThatDiesWithItsParent(SubprocessASGIServer):
        """Prefect's temporary server, started with the parent-death signal."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3.9's command and environment for this server, plus the preexec_fn
            args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                    "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            arm = die_with_parent(os.getpid())
            return popen_from_a_lasting_thread(lambda: subprocess.Popen(args, env=env, preexec_fn=arm))

    return ServerThatDiesWithItsParent


def temporary_server_dies_with_this_process() -> None:
    """Make the temporary server Prefect may start from this process die with this process.

    Call it before the first Prefect client is made. A no-op when PREFECT_API_URL names a server (nothing
    temporary is started), off Linux, or when a temporary server is already registered.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or _libc() is None:
        return
    # Prefect's clients ask SubprocessASGIServer() for the default instance (port None); this registers
    # ours as that instance, the same hook prefect.testing's harness uses for its server
    _server_class()()


def stop_this_process_temporary_server() -> bool:
    """Drain Prefect's background workers (events, API logs), then stop the temporary server this
    module started in this process; False (and nothing done) when there is none, e.g. with
    PREFECT_API_URL set or under a test harness's own server. Without it, both log at interpreter exit
    ('Still processing items ...', 'Stopping temporary server ...'), after the CLI's last line."""
    if _libc() is None or "prefect" not in sys.modules:
        return False
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    # ``_instances``: Prefect 3.9's registry of temporary servers (tests/test_promotion.py fails if it moves)
    ours = [s for s in list(SubprocessASGIServer._instances.values())
            if isinstance(s, _server_class()) and s.server_process is not None]
    if not ours:
        return False
    for service in (EventsWorker, APILogWorker):  # they send to the server: finish before it stops
        service.drain_all(timeout=10)
    for server in ours:
        server.stop()
    return True
