"""The README's code examples run verbatim against a real (tiny) run directory."""
import os
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
    exec(compile(readme_snippet(name), f"README:{name}", "exec"), namespace)
    if name == "read-soul":
        assert len(namespace["images"]) == len(namespace["labels"]) > 0
        assert set(namespace["meta"]["split"]) <= {"train", "val", "test"}
    if name == "read-augmented":
        assert namespace["keep"].sum() <= len(namespace["meta"])
        assert namespace["images"].shape[0] == namespace["keep"].sum()
    if name == "train-segmenter":
        assert namespace["loss"].item() > 0
