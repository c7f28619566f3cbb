"""The step table's driver: a step is served from its record only when nothing it depends on changed."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

import tasks.steps as steps
from storage.errors import BrvoError
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig, preset
from tasks.steps import (Step, StepContext, assert_valid_plan, claim_partial_work, code_fingerprint, read_record,
                         run_plan)

CALLS: list[str] = []


class Out(BaseModel):
    text: str

    def report_section(self) -> dict:
        return {"text": self.text}


def make_manifest(ctx: StepContext) -> Out:
    """Writes manifest.csv from the seed (a stand-in for ingest)."""
    CALLS.append("first")
    ctx.paths.manifest.write_text(f"seed={ctx.config.seed}\n")
    return Out(text=ctx.paths.manifest.read_text())


def make_soul(ctx: StepContext, first: Out) -> Out:
    """Writes soul.h5 from the manifest and the image size (a stand-in for preprocess)."""
    CALLS.append("second")
    ctx.paths.soul_h5.write_text(first.text + f"size={ctx.config.image_size}\n")
    return Out(text=ctx.paths.soul_h5.read_text())


def make_soul_differently(ctx: StepContext, first: Out) -> Out:
    """Another implementation of the same step: a code change."""
    CALLS.append("second-v2")
    ctx.paths.soul_h5.write_text(first.text + f"size={ctx.config.image_size} (v2)\n")
    return Out(text=ctx.paths.soul_h5.read_text())


FIRST = Step("first", make_manifest, Out, writes=("manifest",), config_fields=("seed",), report="first")
SECOND = Step("second", make_soul, Out, needs=("first",), writes=("soul_h5",), config_fields=("image_size",))
PLAN = (FIRST, SECOND)


def _run(tmp_path: Path, config: PipelineConfig | None = None, plan=PLAN, **kw):
    CALLS.clear()
    return run_plan(plan, StepContext(run_dir=tmp_path, config=config or preset("tiny"), log=lambda _m: None), **kw)


def test_second_run_is_served_from_records(tmp_path):
    first = _run(tmp_path)
    assert CALLS == ["first", "second"] and first.cached == []
    again = _run(tmp_path)
    assert CALLS == [] and again.cached == ["first", "second"]
    assert again.result("second") == first.result("second")
    assert again.outcomes["second"].seconds == first.outcomes["second"].seconds  # the computing run's time


def test_a_config_field_recomputes_its_step_and_what_depends_on_it_only(tmp_path):
    _run(tmp_path)
    _run(tmp_path, preset("tiny").with_overrides(image_size=64))  # only SECOND declares image_size
    assert CALLS == ["second"]
    _run(tmp_path, preset("tiny").with_overrides(image_size=64, seed=3))  # FIRST's output changes
    assert CALLS == ["first", "second"]
    _run(tmp_path, preset("tiny").with_overrides(image_size=64, seed=3, samples_per_missing=9))  # nobody's field
    assert CALLS == []


def test_a_deleted_or_replaced_output_recomputes_its_step(tmp_path):
    _run(tmp_path)
    RunPaths.of(tmp_path).soul_h5.unlink()
    _run(tmp_path)
    assert CALLS == ["second"]
    # recomputed with the same bytes: what depends on it stays served
    RunPaths.of(tmp_path).manifest.write_text("seed=0\n")  # same bytes, new mtime
    _run(tmp_path)
    assert CALLS == []
    RunPaths.of(tmp_path).manifest.write_text("tampered\n")
    _run(tmp_path)
    assert CALLS == ["first"]  # rewritten with its original bytes, so what depends on it stays served
    assert RunPaths.of(tmp_path).manifest.read_text() == "seed=0\n"


def test_a_changed_step_function_recomputes_it(tmp_path):
    _run(tmp_path)
    changed = Step("second", make_soul_differently, Out, needs=("first",), writes=("soul_h5",),
                   config_fields=("image_size",))
    _run(tmp_path, plan=(FIRST, changed))
    assert CALLS == ["second-v2"]
    assert "(v2)" in RunPaths.of(tmp_path).soul_h5.read_text()


def test_code_fingerprint_follows_imported_project_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "fixturepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def value():\n    return 1\n")
    (pkg / "stepmod.py").write_text(textwrap.dedent("""
        def run(ctx):
            from fixturepkg.helper import value
            return value()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(steps, "PROJECT_PACKAGES", steps.PROJECT_PACKAGES + ("fixturepkg",))
    import fixturepkg.stepmod

    before = code_fingerprint(fixturepkg.stepmod.run)
    assert code_fingerprint(fixturepkg.stepmod.run) == before
    (pkg / "helper.py").write_text("def value():\n    return 2  # changed\n")
    assert code_fingerprint(fixturepkg.stepmod.run) != before
    sys.modules.pop("fixturepkg.stepmod", None)
    sys.modules.pop("fixturepkg.helper", None)
    sys.modules.pop("fixturepkg", None)


def test_config_modules_do_not_count_as_step_code():
    closure = steps.module_closure("tasks.train_pix2pix")
    assert "brvo_models.pix2pix" in closure and "storage.checkpoints" in closure
    assert not set(closure) & steps.RESULT_NEUTRAL_MODULES


def test_only_takes_upstream_results_from_their_records(tmp_path):
    with pytest.raises(BrvoError, match="no finished 'first' step"):
        _run(tmp_path, only={"second"})
    _run(tmp_path)
    _run(tmp_path, preset("tiny").with_overrides(seed=5), only={"second"})
    assert CALLS == []  # first is taken as recorded (seed 0), second's inputs did not change
    RunPaths.of(tmp_path).manifest.unlink()
    with pytest.raises(BrvoError, match="outputs changed"):
        _run(tmp_path, only={"second"})


def test_records_survive_a_deleted_report_and_hold_results(tmp_path):
    _run(tmp_path)
    record = read_record(RunPaths.of(tmp_path), "second")
    assert record is not None and Out.model_validate(record.result).text.endswith("size=32\n")
    assert set(record.outputs) == {"soul.h5"}
    (RunPaths.of(tmp_path).step_records / "second.json").write_text("{not json")
    _run(tmp_path)
    assert CALLS == ["second"]  # an unreadable record is a miss, never an error


def test_a_step_that_does_not_write_what_it_declares_fails(tmp_path):
    lazy = Step("first", lambda ctx: Out(text=""), Out, writes=("manifest",))
    with pytest.raises(RuntimeError, match="without writing"):
        _run(tmp_path, plan=(lazy,))


def test_plan_declarations_are_checked():
    assert_valid_plan(PLAN)
    with pytest.raises(ValueError, match="needs"):
        assert_valid_plan((SECOND, FIRST))
    with pytest.raises(ValueError, match="unknown RunPaths"):
        assert_valid_plan((Step("x", make_manifest, Out, writes=("nope",)),))
    with pytest.raises(KeyError, match="unknown config field"):
        assert_valid_plan((Step("x", make_manifest, Out, config_fields=("pix2pix.nope",)),))


def test_partial_work_is_resumed_only_for_the_same_key(tmp_path):
    work = tmp_path / "checkpoints"
    messages: list[str] = []
    ctx = StepContext(run_dir=tmp_path, config=preset("tiny"), log=messages.append, key="aaa")
    claim_partial_work(work, ctx)
    (work / "last.pt").write_bytes(b"epoch 3")
    claim_partial_work(work, ctx)  # a rerun of the same step: resume
    assert (work / "last.pt").exists() and messages == []
    claim_partial_work(work, StepContext(run_dir=tmp_path, config=preset("tiny"), log=messages.append, key="bbb"))
    assert not (work / "last.pt").exists() and "starting over" in messages[0]
    assert json.loads((work / "claimed_by.json").read_text()) == {"key": "bbb"}


def test_the_pipeline_plans_are_valid():
    from flows.augment import AUGMENT
    from flows.prepare import PREPARE

    for plan in (AUGMENT, PREPARE):
        assert_valid_plan(plan)


def _refuses(ctx: StepContext) -> Out:
    raise BrvoError("checkpoint refused: trained at 64 px; use a fresh run directory")


def _crashes(ctx: StepContext) -> Out:
    raise ValueError("a bug")


@pytest.mark.usefixtures("prefect_harness")
def test_expected_errors_log_one_line_in_prefect_unexpected_keep_their_traceback(tmp_path):
    """Issue 15 #11: a BrvoError in a step is one line in the run log, like on the console."""
    import logging

    from prefect import flow

    from tasks.reporting import PREFECT_RUN_LOGGERS
    from tasks.steps import execute_with_prefect

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    @flow
    def one_step(step_fn):
        return run_plan((Step("failing", step_fn, Out),), StepContext(run_dir=tmp_path, config=preset("tiny")),
                        execute=execute_with_prefect)

    for step_fn, error, traceback_expected in ((_refuses, BrvoError, False), (_crashes, ValueError, True)):
        keep = Keep()
        loggers = [logging.getLogger(name) for name in PREFECT_RUN_LOGGERS]
        for logger in loggers:
            logger.addHandler(keep)
        try:
            with pytest.raises(error):
                one_step(step_fn)
        finally:
            for logger in loggers:
                logger.removeHandler(keep)
        assert keep.records, "the failure is logged"
        assert any(r.exc_info for r in keep.records) == traceback_expected
