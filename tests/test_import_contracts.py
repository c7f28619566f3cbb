"""The layering as contracts (pyproject.toml [tool.importlinter], checked by import-linter in `make test`):
deployments -> flows -> tasks -> brvo_models -> storage, no import circle, brvo_models and storage free of
Prefect, the step engine free of any step."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports({config!r}, no_cache=True))"


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT.format(config=str(config))], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_project_keeps_its_import_contracts():
    declared = {c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
                ["contracts"]}
    assert declared == {"deployments -> flows -> tasks -> brvo_models -> storage",
                        "brvo_models and storage are free of Prefect", "the step engine knows no step",
                        "no import circle between the packages of a layer, nor between the modules of a package"}
    done = _lint(ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout


def test_a_broken_contract_fails_the_check(tmp_path):
    """The check can fail: a contract this tree breaks (the step engine imports storage) is reported broken."""
    config = tmp_path / "broken.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["tasks", "storage"]\n\n[[tool.importlinter.contracts]]\n'
                      'name = "engine without storage"\ntype = "forbidden"\nsource_modules = ["tasks.engine"]\n'
                      'forbidden_modules = ["storage"]\n')
    done = _lint(config)
    assert done.returncode != 0 and "BROKEN" in done.stdout


def test_the_engine_contract_names_every_step_module():
    """A new step module must join the list the step engine may not import (docs/design.md, adding a step)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (engine,) = [c for c in contracts if c["name"] == "the step engine knows no step"]
    steps = {f"tasks.{p.stem}" for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert steps <= set(engine["forbidden_modules"]), sorted(steps - set(engine["forbidden_modules"]))
