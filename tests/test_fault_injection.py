"""benchmarks/fault_injection.py: its case table covers every item of both hardening passes with a stated
expectation, a row's verdict comes from its check alone, and a cheap case runs the real CLI end to end."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "fault_injection.py"


@pytest.fixture(scope="module")
def fi():
    try:
        yield load_benchmark("fault_injection")
    finally:
        sys.modules.pop("fault_injection", None)


def test_every_item_of_both_passes_has_a_case_with_a_stated_expectation(fi):
    ids = [case.id for case in fi.CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    items = set()
    for case_id in ids:
        match = re.fullmatch(r"(28|15|P)\.(\d+)[a-z]?", case_id)
        assert match, case_id
        items.add((match.group(1), int(match.group(2))))
    assert {("28", n) for n in range(1, 17)} <= items  # issue 28's sixteen items
    assert {("15", n) for n in range(1, 13)} <= items  # issue 15's twelve defects
    assert ("P", 1) in items  # the first pass's kill-and-resume identity
    for case in fi.CASES:
        assert case.title.strip() and case.expected.strip(), case.id
        assert case.run is None or callable(case.run), case.id
    # only the README's wording is left to tests/test_readme.py, and the row says so
    assert [case.id for case in fi.CASES if case.run is None] == ["28.16a"]
    assert "tests/test_readme.py" in next(c for c in fi.CASES if c.run is None).expected


def test_a_row_is_held_or_broke_by_its_check_and_a_harness_failure_is_not_a_verdict(fi, tmp_path):
    harness = fi.Harness(tmp_path)

    def raises(h, d):
        raise RuntimeError("a bug in the harness")

    rows = [fi.run_case(harness, fi.Case(f"T.{i}", "t", "e", run))
            for i, run in enumerate([lambda h, d: fi.Outcome("fine", True), lambda h, d: fi.Outcome("bad", False),
                                     raises])]
    assert [row.result for row in rows] == ["held", "broke", "error"]
    assert "a bug in the harness" in rows[2].observed
    # cells with pipes and line breaks stay in their columns
    text = fi.render([fi.Row("28.12", "a | b", "x |z| <= 3", "line\nbreak", "held", 1.0)], "today", 60.0, None)
    assert fi.broken_table_rows(text) == [] and "1 held, 0 broke" in text


def test_a_cheap_case_runs_the_cli_and_holds(tmp_path):
    """`--config` with Infinity through the real `.venv/bin/brvo-augment run`; the table and JSON go to --out."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", r"^28\.11e", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "fault-injection.json").read_text())
    assert [(row["id"], row["result"]) for row in data["rows"]] == [("28.11e", "held")]
    assert "pix2pix.lr must be a finite number, got inf" in data["rows"][0]["observed"]
    table = (tmp_path / "fault-injection.md").read_text()
    assert "1 held, 0 broke, 0 skipped, 0 harness errors" in table and "| 28.11e" in table
