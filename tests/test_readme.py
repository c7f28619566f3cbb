"""The README's code examples run verbatim against a real (tiny) run directory."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def readme_snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README snippet {name!r} not found"
    return match.group(1)


@pytest.mark.parametrize("name", ["read-soul", "read-augmented", "train-segmenter"])
def test_readme_snippet_runs(name, tiny_augment_run, tmp_path, monkeypatch):
    _, run_dir, _ = tiny_augment_run
    (tmp_path / "demo_run").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    import torch

    torch.manual_seed(0)  # the snippet's shuffling and initial weights: the same run every time
    exec(compile(readme_snippet(name), f"README:{name}", "exec"), namespace)
    if name == "read-soul":
        assert len(namespace["images"]) == len(namespace["labels"]) > 0
        assert set(namespace["meta"]["split"]) <= {"train", "val", "test"}
    if name == "read-augmented":
        meta, keep = namespace["meta"], namespace["keep"]
        assert (~meta["is_synthetic"]).sum() > 0 and meta["is_synthetic"].sum() > 0
        assert keep[~meta["is_synthetic"].to_numpy()].all()  # every real row is kept
        dropped = meta[~keep]
        assert dropped["is_synthetic"].all() and not dropped["accepted"].any()  # only rejected synthetic rows go
        assert namespace["images"].shape[0] == namespace["labels"].shape[0] == keep.sum()
    if name == "train-segmenter":
        _assert_the_snippet_learned(namespace)


def _assert_the_snippet_learned(namespace: dict) -> None:
    """The README's training loop must improve on the same network untrained (its loss on the rows)."""
    import torch
    from torch.utils.data import DataLoader

    trained, train = namespace["net"], namespace["train"]
    torch.manual_seed(0)
    untrained = type(trained)(input_nc=1, output_nc=1, num_downs=namespace["size"].bit_length() - 1, ngf=8)

    def mean_loss(net) -> float:
        net.eval()
        total = n = 0
        with torch.no_grad():
            for image, label, _ in DataLoader(train, batch_size=64):
                prob = ((net(image * 2 - 1) + 1) / 2).clamp(1e-5, 1 - 1e-5)
                total += torch.nn.functional.binary_cross_entropy(prob, label, reduction="sum").item()
                n += label.numel()
        return total / n

    assert mean_loss(trained) < 0.95 * mean_loss(untrained)  # untrained: ~0.69 (p = 0.5 everywhere)


# ----------------------------------------------------------------------------------- the README, tried verbatim

DOCS = [README, README.parent / "docs" / "ui.md"]
VENV_TOOLS = ("brvo-augment", "prefect", "python", "pytest", "pip")


def _shell_blocks(text: str) -> list[str]:
    """Fenced bash blocks and indented command blocks (the README's 'Commands' list)."""
    fenced = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    indented = [m for m in re.findall(r"(?:^|\n\n)((?:    [^\n]*\n)+)", re.sub(r"```.*?```", "", text, flags=re.S))]
    return fenced + indented


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    level = heading.split(" ")[0]
    rest = text[start + len(heading):]
    end = re.search(rf"\n{level} ", rest)
    return rest[: end.start()] if end else rest


def test_readme_says_how_to_install():
    text = README.read_text()
    assert any(re.search(r"^make install\b", line.strip()) for block in _shell_blocks(text)
               for line in block.splitlines()), "no 'make install' command in the README"
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^install:", makefile, re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_names_the_venv(doc):
    """A fresh clone has no brvo-augment or prefect on PATH: every command the docs ask a user to type
    runs from .venv/bin (or the docs say to activate the venv first, which this README does not need)."""
    bare = []
    for block in _shell_blocks(doc.read_text()):
        for line in block.splitlines():
            words = [w for w in line.strip().split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
            if words and words[0] in VENV_TOOLS:
                bare.append(line.strip())
    bare += [span for span in re.findall(r"`([^`\n]+)`", doc.read_text())
             if span.split()[0] == "brvo-augment" and len(span.split()) > 1]
    assert not bare, "commands without .venv/bin/:\n" + "\n".join(bare)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_quality_bar_counts_match_the_code(doc):
    from tasks.rendering.report import BAR_MEANING

    counts = re.findall(r"\b(\d+) of (\d+) quality bars", doc.read_text())
    assert all(int(total) == len(BAR_MEANING) for _, total in counts), (counts, sorted(BAR_MEANING))


def test_service_section_says_it_takes_three_terminals_and_what_runs_in_each():
    service = _section(README.read_text(), "## Run as a service")
    assert re.search(r"three terminals", service, re.I)
    for n, what in ((1, "prefect server start"), (2, "brvo-augment serve"), (3, "prefect deployment run")):
        assert re.search(rf"[Tt]erminal {n}\b[^\n]*\n?[^\n]*{re.escape(what)}", service), (n, what)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_start_verbatim_on_a_non_default_port_serves_a_working_ui(tmp_path):
    """Step 1 of 'Run as a service', as written, with only its port changed: the server must answer on
    that port, and the UI must be told to call the API there (else it shows 'Oops. Something went
    wrong' until the server restarts)."""
    import json
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    step1 = _section(_section(README.read_text(), "## Run as a service"), "### 1.")
    script = "\n".join(re.findall(r"```bash\n(.*?)```", step1, re.S))
    port = _free_port()
    script = re.sub(r"^PORT=4200\b", f"PORT={port}", script, flags=re.M)  # the one line a user edits
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["bash", "-c", script], cwd=README.parent, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        settings, deadline = None, time.monotonic() + 120
        while settings is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=2) as resp:
                    settings = json.loads(resp.read())
            except OSError:
                time.sleep(0.5)
        assert settings is not None, f"nothing answered on port {port}:\n{log.read_text()[-2000:]}"
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api", settings
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()  # the UI itself is served
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
