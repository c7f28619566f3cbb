"""The service as users run it: a real `prefect server start`, the serve command, and the real CLI.

One server for the module (~15 s to start here). Runs execute in subprocesses of the serve
command, exactly as in production; every process this module starts is stopped in a
``finally`` (SIGTERM to its process group, SIGKILL after a bounded wait).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from storage.paired_format import validate
from storage.registry import ModelRegistry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
SERVER_START_S = 90
RUN_TIMEOUT_S = 240
TEST_CRON = "0 4 * * 2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_env(home: Path, port: int, registry: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BRVO_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",  # not needed by the test; saves start-up time
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "COLUMNS": "200",
        "BRVO_REGISTRY_DIR": str(registry),
        "BRVO_RETRAIN_CRON": TEST_CRON,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        fh.close()


def _stop(proc: subprocess.Popen | None, wait_s: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL if it outlives ``wait_s``."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _api(env: dict[str, str], path: str, body: dict | None = None):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _wait_for(what: str, check, timeout_s: float, procs: dict[str, tuple[subprocess.Popen, Path]]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                            + log.read_text(errors="replace")[-3000:])
        try:
            value = check()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{log.read_text(errors='replace')[-2000:]}" for n, (_, log) in procs.items())
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A real Prefect server + `brvo-augment serve` against it; yields (env, workdir, timings)."""
    work = tmp_path_factory.mktemp("service")
    port = _free_port()
    env = _service_env(work / "prefect_home", port, work / "registry")
    server = serve = None
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        server_log = work / "server.log"
        server = _start(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--analytics-off", "--no-ui"], env, server_log)
        procs = {"prefect server": (server, server_log)}
        _wait_for("/api/health", lambda: _api(env, "/health") is True, SERVER_START_S, procs)
        timings["server_start_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        serve_log = work / "serve.log"
        serve = _start([sys.executable, "-m", "flows.cli", "serve"], env, serve_log)
        procs["brvo-augment serve"] = (serve, serve_log)

        def both_registered():
            names = {d["name"] for d in _api(env, "/deployments/filter", {})}
            return {"augment", "retrain"} <= names

        _wait_for("both deployments", both_registered, 90, procs)
        timings["serve_registered_s"] = time.monotonic() - t0
        yield env, work, timings
    finally:
        _stop(serve)
        _stop(server)
        print("service timings:", {k: round(v, 1) for k, v in timings.items()})


def _deployment_run(env: dict[str, str], name: str, params: dict[str, str]) -> tuple[str, float]:
    cmd = PREFECT + ["deployment", "run", name, "--watch", "--watch-interval", "1"]
    for key, value in params.items():
        cmd += ["-p", f"{key}={value}"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        serve_log = Path(env["PREFECT_HOME"]).parent / "serve.log"
        pytest.fail(f"{name} did not finish in {RUN_TIMEOUT_S} s; serve log tail:\n"
                    + serve_log.read_text(errors="replace")[-4000:])
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and re.search(r"finished (successfully )?in (state )?'?Completed", out), out[-4000:]
    return out, seconds


def _json_param(value: str) -> str:
    return json.dumps(value)  # -p values are parsed as JSON when they can be: quote paths


def test_schedule_is_registered_with_configured_cron(service):
    env, _, _ = service
    deps = {d["name"]: d for d in _api(env, "/deployments/filter", {})}
    crons = [s["schedule"].get("cron") for s in deps["retrain"]["schedules"]]
    assert crons == [TEST_CRON] and all(s["active"] for s in deps["retrain"]["schedules"])
    assert deps["augment"]["schedules"] == []
    assert deps["augment"]["parameters"].get("registry_dir") == env["BRVO_REGISTRY_DIR"]
    assert {"soul_dir", "run_dir", "preset", "image_size"} <= set(
        deps["augment"]["parameter_openapi_schema"]["properties"])


def _soul(work: Path) -> Path:
    soul = work / "soul"
    if not soul.exists():
        from flows.phantom import PhantomConfig, generate_phantom

        generate_phantom(soul, PhantomConfig(n_patients=6, seed=0))
    return soul


def _retrain(env: dict[str, str], work: Path) -> tuple[dict, float]:
    params = {"soul_dir": _json_param(str(_soul(work))), "preset": "tiny"}  # registry_dir: the deployment's
    out, seconds = _deployment_run(env, "retrain/retrain", params)
    status = json.loads((Path(env["BRVO_REGISTRY_DIR"]) / "last_retrain.json").read_text())
    # every retrain says what it did, in its artifact and its final state message, not only a green 'Completed'
    flow_run_id = _flow_run_id(out)
    artifact = _artifacts(env, flow_run_id)["retrain-result"]["data"]
    assert artifact.startswith(f"# retrain: {status['status']}") and (status.get("version") or "") in artifact
    assert _api(env, f"/flow_runs/{flow_run_id}")["state"]["message"].startswith(status["status"])
    return status, seconds


def test_retrain_deployment_publishes_models(service):
    env, work, timings = service
    status, seconds = _retrain(env, work)
    timings["retrain_first_s"] = seconds
    # one tiny epoch may miss its quality bars: then the version is published but not promoted to latest
    assert status["status"] in ("retrained", "published"), status
    registry = ModelRegistry(env["BRVO_REGISTRY_DIR"])
    assert registry.versions() == [status["version"]]
    assert registry.latest_version() == (status["version"] if status["promoted"] else None)
    models = registry.resolve(status["version"])
    assert models.pix2pix_checkpoint.is_file() and models.crgan_checkpoint.is_file()
    assert models.config["image_size"] == 32 and "pix2pix" in models.metrics and "crgan" in models.metrics
    print(f"retrain (tiny, 6 patients): trained and published {status['version']} in {seconds:.1f} s")


def test_augment_deployment_run_uses_registry_and_produces_valid_dataset(service):
    env, work, timings = service
    registry = ModelRegistry(env["BRVO_REGISTRY_DIR"])
    if not registry.versions():  # when run on its own
        _retrain(env, work)
    run_dir = work / "run"
    out, seconds = _deployment_run(env, "augment/augment", {  # pinned: the tiny models may not be promoted
        "soul_dir": _json_param(str(_soul(work))), "run_dir": _json_param(str(run_dir)), "preset": "tiny",
        "model_version": _json_param(registry.newest_version())})
    timings["augment_tiny_run_to_completed_s"] = seconds
    print(f"augment/augment (tiny, 6 patients, registry models): prefect deployment run -> Completed in {seconds:.1f} s")
    summary = validate(run_dir / "augmented.h5")
    assert summary.n_synthetic > 0 and summary.n_real > 0
    # the deployment's default registry_dir had models: augment used them instead of training
    assert not (run_dir / "checkpoints" / "pix2pix" / "best.pt").exists()
    _assert_what_a_researcher_sees(env, _flow_run_id(out), run_dir)
    _assert_the_outcome_is_named(env, out, run_dir)


def _flow_run_id(watch_output: str) -> str:
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", watch_output)
    assert match, watch_output[-2000:]
    return match.group(1)


def _artifacts(env: dict[str, str], flow_run_id: str) -> dict[str, dict]:
    rows = _api(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in rows if a.get("key")}


def _assert_what_a_researcher_sees(env: dict[str, str], flow_run_id: str, run_dir: Path) -> None:
    """Issue 13, read back through the API: the result, the report with its images, warnings, state message."""
    report = json.loads((run_dir / "report.json").read_text())
    artifacts = _artifacts(env, flow_run_id)
    assert {"augment-result", "augment-report", "augment-scores", "augment-montages"} <= set(artifacts)
    assert "data:image/png;base64," in artifacts["augment-report"]["data"]  # figures inline, not file paths
    assert artifacts["augment-montages"]["data"].count("data:image/png;base64,") >= 1
    result = artifacts["augment-result"]["data"]
    assert str(run_dir / "augmented.h5") in result and "quality bars met" in result
    assert "registry" in result  # the models' origin (a registry version here)
    state = _api(env, f"/flow_runs/{flow_run_id}")["state"]
    met, total = sum(report["bars"].values()), len(report["bars"])
    assert state["message"].startswith(f"{met} of {total} quality bars met"), state
    warnings = [log["message"] for log in _api(env, "/logs/filter", {
        "logs": {"flow_run_id": {"any_": [flow_run_id]}, "level": {"ge_": 30}}})]
    for bar, ok in report["bars"].items():
        assert ok or any(bar in w for w in warnings), (bar, warnings)
    if report["synthetic"]["accepted"] == 0:
        assert any("none of the" in w for w in warnings), warnings


def _assert_the_outcome_is_named(env: dict[str, str], watch_output: str, run_dir: Path) -> None:
    """The runs list and `--watch` show the state's name: a run that missed bars is named for them, and the
    flow's last log line is the one-line summary."""
    from flows.final_state import outcome_name
    from tasks.rendering.report import warnings_of

    report = json.loads((run_dir / "report.json").read_text())
    assert not all(report["bars"].values()), report["bars"]  # the tiny preset misses bars: the case at hand
    name = outcome_name(report["bars"], warnings_of(report))
    flow_run_id = _flow_run_id(watch_output)
    state = _api(env, f"/flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "COMPLETED" and state["name"] == name, state
    assert f"Flow run finished successfully in '{name}'" in watch_output, watch_output[-2000:]
    logs = _api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC",
                                      "limit": 5})
    last = next(log["message"] for log in logs if not log["message"].startswith("Finished in state"))
    assert last.startswith(f"{name} - ") and str(run_dir / "report.md") in last, logs


def test_retrain_again_without_new_data_is_no_change(service):
    env, work, timings = service
    registry = ModelRegistry(env["BRVO_REGISTRY_DIR"])
    if not registry.versions():  # when run on its own
        _retrain(env, work)
    before = registry.versions()
    status, seconds = _retrain(env, work)
    timings["retrain_no_change_s"] = seconds
    assert status["status"] == "no change" and status["version"] == before[-1], status
    assert registry.versions() == before
    print(f"retrain without new data: 'no change' in {seconds:.1f} s")


def test_prefect_yaml_deploys_to_a_process_work_pool(service):
    """For users who run workers: `prefect deploy --all` reads prefect.yaml (runs last: it replaces
    the served deployments of the same names)."""
    env, _, _ = service

    def cli(*args: str) -> str:
        proc = subprocess.run(PREFECT + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    cli("work-pool", "create", "brvo-process", "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    deps = {d["name"]: d for d in _api(env, "/deployments/filter", {})}
    for name in ("augment", "retrain"):
        assert deps[name]["work_pool_name"] == "brvo-process"
        assert deps[name]["entrypoint"] == f"flows/{name}.py:{name}"
        assert deps[name]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert [s["schedule"]["cron"] for s in deps["retrain"]["schedules"]] == ["0 3 * * 1"]


def test_bad_schedule_is_a_one_line_error(capsys, monkeypatch):
    """No server needed: the schedule is checked before anything is registered."""
    from deployments.serve import main, retrain_schedule

    monkeypatch.delenv("BRVO_RETRAIN_CRON", raising=False)
    assert main(["--cron", "61 * * * *"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid retrain schedule '61 * * * *'") and err.count("\n") == 1
    assert main(["--timezone", "Mars/Olympus"]) == 2
    assert "unknown timezone 'Mars/Olympus'" in capsys.readouterr().err
    monkeypatch.setenv("BRVO_RETRAIN_CRON", "15 2 * * *")
    assert retrain_schedule().cron == "15 2 * * *" and retrain_schedule("0 3 * * 1").cron == "0 3 * * 1"
