"""What a user of the CLI and the service meets: the CLI's temporary Prefect server dies with the CLI,
and a run's outcome is visible in its final state's name and in one summary line."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 120


def _clean_env(home: Path) -> dict[str, str]:
    """No PREFECT_API_URL anywhere (environment or profile): the CLI starts its own temporary server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BRVO_"))}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_START_S), "PYTHONUNBUFFERED": "1"})
    return env


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _temporary_server_of(cli: subprocess.Popen, log: Path) -> tuple[int, int]:
    """(pid, port) of the uvicorn child the CLI started, once it answers on its port."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if cli.poll() is not None:
            pytest.fail(f"the CLI exited with {cli.returncode} before its server was up:\n{log.read_text()[-3000:]}")
        for pid in _children(cli.pid):
            args = _cmdline(pid)
            if "uvicorn" in args and "--port" in args:
                port = int(args[args.index("--port") + 1])
                if _answers(port):
                    return pid, port
        time.sleep(0.3)
    pytest.fail(f"no temporary server answered within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_temporary_server_dies_with_a_killed_cli(tmp_path):
    """`kill -9` cannot be trapped: the server must notice its parent's death itself and go, freeing its
    memory and its loopback port. `serve` without PREFECT_API_URL is a CLI command that runs until stopped."""
    log = tmp_path / "cli.log"
    with open(log, "wb") as fh:
        cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, env=_clean_env(tmp_path / "home"),
                               stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server_pid = None
    try:
        server_pid, port = _temporary_server_of(cli, log)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (_alive(server_pid) or _answers(port)):
            time.sleep(0.2)
        assert not _alive(server_pid), f"temporary server {server_pid} outlived the killed CLI"
        assert not _answers(port)
    finally:
        for pid in (cli.pid, server_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


SERVER_FROM_A_THREAD = """
import sys, threading, time
from prefect.server.api.server import SubprocessASGIServer
from flows.temporary_server import temporary_server_dies_with_this_process

temporary_server_dies_with_this_process()
starter = threading.Thread(target=lambda: SubprocessASGIServer().start())
starter.start()
starter.join()
server = SubprocessASGIServer()
print(server.server_process.pid, server.port, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_temporary_server_outlives_the_thread_that_started_it(tmp_path):
    """The parent-death signal follows the forking thread: a server first needed on a worker thread
    (a task runner's) must keep running after that thread ends, and still die with the process."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER_FROM_A_THREAD], cwd=REPO, env=_clean_env(tmp_path / "home"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    server_pid = None
    try:
        server_pid, port = map(int, proc.stdout.readline().split())
        time.sleep(2)  # the starting thread has ended by now
        assert _alive(server_pid) and _answers(port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(server_pid):
            time.sleep(0.2)
        assert not _alive(server_pid) and not _answers(port)
    finally:
        for pid in (proc.pid, server_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------- the run's outcome


def test_final_state_name_counts_the_missed_bars():
    """The runs list shows a state's name, not its message: a missed bar must change the name."""
    from flows.final_state import outcome_state

    clean = outcome_state({"a": True, "b": True}, [])
    assert clean.name == "Completed" and clean.is_completed()
    one = outcome_state({"a": True, "b": False}, ["quality bar not met: b (...)"])
    assert one.name == "Completed: 1 bar missed" and one.is_completed()
    three = outcome_state({"a": False, "b": False, "c": True, "d": False}, ["w1", "w2", "w3", "w4"])
    assert three.name == "Completed: 3 bars missed"
    assert three.message == "1 of 4 quality bars met (missed: a, b, d); 4 warnings"
    warned = outcome_state({"a": True}, ["only 3 held-out test patient(s) ..."])
    assert warned.name == "Completed: 1 warning" and warned.message == "1 of 1 quality bars met; 1 warning"
    # a flow's own account (retrain: what it published and why) is the message, not followed by the bars it
    # already judged; a verdict the list must show comes first in the name; the data is the flow's result
    lead = "published v0002, not promoted: 1 bar missed (pix2pix_beats_baselines)"
    led = outcome_state({"pix2pix_beats_baselines": False}, ["w", "v"], lead=lead, verdict="not promoted",
                        data={"x": 1})
    assert led.name == "Completed: not promoted, 1 bar missed" and led.message == f"{lead}; 2 warnings"
    assert led.data == {"x": 1}
    assert outcome_state({"a": True}, ["v"], lead="published v0002, not promoted: ...",
                         verdict="not promoted").name == "Completed: not promoted"
    assert outcome_state({}, []).message == "no quality bar measured"
    unchanged = outcome_state({}, [], lead="no change since v0002")
    assert unchanged.name == "Completed" and unchanged.message == "no change since v0002"


@pytest.mark.slow
def test_augment_run_ends_named_for_its_missed_bars_and_says_so_last(tiny_augment_run, capsys):
    """The tiny preset misses bars on purpose. Its run must not finish as the same green 'Completed' as a
    clean one: the state the server records is named for the missed bars, and the CLI's last line says so."""
    import json

    from prefect.client.orchestration import get_client

    from flows.augment import augment
    from flows.cli import main

    soul_dir, run_dir, _ = tiny_augment_run
    report = json.loads((run_dir / "report.json").read_text())
    missed = [bar for bar, met in report["bars"].items() if not met]
    assert missed, report["bars"]  # the case this test is about
    name = f"Completed: {len(missed)} bar{'s' if len(missed) > 1 else ''} missed"

    state = augment(soul_dir=str(soul_dir), run_dir=str(run_dir), preset="tiny", return_state=True)
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).state
    assert recorded.name == name and recorded.is_completed()
    assert f"(missed: {', '.join(missed)})" in recorded.message

    capsys.readouterr()
    assert main(["run", str(soul_dir), str(run_dir)]) == 0  # every step served from its record
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{name} - ") and str(run_dir / "report.md") in last, last
