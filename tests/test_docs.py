"""The documents a newcomer reads first: the README's top is readable, and docs/design.md is linked and true."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"


def _prose_lines(text: str):
    """(number, line) of every line outside fenced and indented code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            yield number, line


def test_no_readme_line_outside_code_is_over_120_characters():
    long = [f"{n}: {len(line)}" for n, line in _prose_lines(README.read_text()) if len(line) > 120]
    assert not long, long


def test_the_readme_links_the_design_page_and_every_doc_it_names_exists():
    text = README.read_text()
    assert "docs/design.md" in text
    for target in re.findall(r"\]\((docs/[^)#\s]+)\)", text):
        assert (ROOT / target).exists(), target


def test_the_design_page_describes_the_house_as_it_is():
    text = DESIGN.read_text()
    assert "one module per pipeline step, named as the step" in text and "never torch outside" not in text
    adding = text.split("### Adding a step", 1)[1].split("\n## ", 1)[0]
    for place in ("tasks/<name>.py", "storage/run_dir.py", "tasks/config/schema.py", "flows/plans.py",
                  "StepCommand", "tasks/rendering/report.py", "tasks/analyses/quality_bars.py", "pyproject.toml",
                  "tests/test_layout.py", "tests/test_adding_a_step.py"):
        assert place in adding, place
    for path in re.findall(r"`((?:tasks|flows|storage|brvo_models|deployments)/[\w/]+\.py)`", text):
        assert (ROOT / path).exists(), f"docs/design.md names {path}, which does not exist"
