"""The step table's driver: a step is served from its record only when nothing it depends on changed."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

import tasks.engine as steps
from storage.errors import BrvoError
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig, preset
from tasks.engine import (Step, StepContext, assert_valid_plan, claim_partial_work, code_fingerprint, read_record,
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
    tmp_path.mkdir(parents=True, exist_ok=True)
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
    import tasks.engine.identity as identity

    monkeypatch.setattr(identity, "PROJECT_PACKAGES", identity.PROJECT_PACKAGES + ("fixturepkg",))
    import fixturepkg.stepmod

    before = code_fingerprint(fixturepkg.stepmod.run)
    assert code_fingerprint(fixturepkg.stepmod.run) == before
    (pkg / "helper.py").write_text("def value():\n    return 2  # changed\n")
    assert code_fingerprint(fixturepkg.stepmod.run) != before
    sys.modules.pop("fixturepkg.stepmod", None)
    sys.modules.pop("fixturepkg.helper", None)
    sys.modules.pop("fixturepkg", None)


def test_config_modules_do_not_count_as_step_code():
    closure = steps.module_closure("tasks.pix2pix")
    assert "brvo_models.pix2pix" in closure and "storage.checkpoints" in closure
    assert not [name for name in closure if steps.is_result_neutral(name)]


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
    """A BrvoError in a step is one line in the run log, like on the console."""
    import logging

    from prefect import flow

    from tasks.engine.logs import PREFECT_RUN_LOGGERS, install_one_line_errors
    from tasks.engine import execute_with_prefect

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    @flow
    def one_step(step_fn):
        install_one_line_errors()  # as flows.run_steps does where a flow starts
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


# --------------------------------------------------------------------- independent steps at once

def _wait_for_partner(ctx: StepContext, me: str, partner: str) -> None:
    """When the run directory asks for it, prove the partner step runs at the same time: announce, then
    wait for the partner's announcement (across threads or processes: marker files)."""
    import os
    import time

    if not (ctx.run_dir / "expect_partner").exists():
        return
    (ctx.run_dir / f"{me}.started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (ctx.run_dir / f"{partner}.started").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me}: {partner} never ran at the same time")
        time.sleep(0.05)


def make_left(ctx: StepContext, first: Out) -> Out:
    """Needs only FIRST (a stand-in for a training)."""
    _wait_for_partner(ctx, "left", "right")
    ctx.paths.quarantine.write_text(first.text + "left\n")
    return Out(text=ctx.paths.quarantine.read_text())


def make_right(ctx: StepContext, first: Out) -> Out:
    """Needs only FIRST too: independent of LEFT."""
    _wait_for_partner(ctx, "right", "left")
    ctx.paths.stage_table.write_text(first.text + "right\n")
    return Out(text=ctx.paths.stage_table.read_text())


def make_join(ctx: StepContext, left: Out, right: Out) -> Out:
    ctx.paths.soul_h5.write_text(left.text + right.text)
    return Out(text=ctx.paths.soul_h5.read_text())


LEFT = Step("left", make_left, Out, needs=("first",), writes=("quarantine",), config_fields=("seed",))
RIGHT = Step("right", make_right, Out, needs=("first",), writes=("stage_table",), config_fields=("seed",))
JOIN = Step("join", make_join, Out, needs=("left", "right"), writes=("soul_h5",))
FORK = (FIRST, LEFT, RIGHT, JOIN)


def _same_records(a: Path, b: Path, names) -> None:
    for name in names:
        ra, rb = read_record(RunPaths.of(a), name), read_record(RunPaths.of(b), name)
        assert ra.key == rb.key and ra.result == rb.result, name
        assert {k: v.sha256 for k, v in ra.outputs.items()} == {k: v.sha256 for k, v in rb.outputs.items()}, name


def test_independent_steps_run_together_with_the_results_and_records_of_a_sequential_run(tmp_path):
    seen: list[list[str]] = []

    def together(calls):
        seen.append([c.step.name for c in calls])
        return steps.run_together_in_threads(calls)

    sequential = _run(tmp_path / "sequential", plan=FORK)
    (tmp_path / "together").mkdir()
    (tmp_path / "together" / "expect_partner").write_text("")  # each of left/right waits for the other
    concurrent = _run(tmp_path / "together", plan=FORK, run_together=together)
    assert seen == [["left", "right"]]  # first and join have dependencies: they run alone
    assert list(concurrent.outcomes) == ["first", "left", "right", "join"]
    assert {k: v.result for k, v in concurrent.outcomes.items()} == {k: v.result for k, v in sequential.outcomes.items()}
    _same_records(tmp_path / "sequential", tmp_path / "together", ["first", "left", "right", "join"])
    again = _run(tmp_path / "together", plan=FORK, run_together=together)
    assert again.cached == ["first", "left", "right", "join"]


def test_a_failing_step_of_a_group_fails_the_plan_after_its_partner_finished(tmp_path):
    def broken_right(ctx: StepContext, first: Out) -> Out:
        raise BrvoError("right: bad input")

    plan = (FIRST, LEFT, Step("right", broken_right, Out, needs=("first",)), JOIN)
    with pytest.raises(BrvoError, match="bad input"):
        _run(tmp_path, plan=plan, run_together=steps.run_together_in_threads)
    assert read_record(RunPaths.of(tmp_path), "left") is not None  # the partner's work is kept


def test_concurrency_is_on_for_cuda_runs_only_unless_forced():
    from tasks.engine.concurrency import concurrent_steps_enabled, group_executor

    cpu = preset("tiny").with_overrides(device="cpu")
    assert not concurrent_steps_enabled(cpu) and group_executor(cpu, steps.execute_plainly) is None
    assert concurrent_steps_enabled(cpu.with_overrides(concurrent_steps="on"))
    assert not concurrent_steps_enabled(cpu.with_overrides(device="auto", concurrent_steps="off"))
    assert group_executor(cpu.with_overrides(concurrent_steps="on"), steps.execute_plainly) is not None


def test_device_steps_of_a_group_get_a_gpu_each_where_there_are_several(tmp_path):
    from tasks.engine.concurrency import spread_over_gpus

    ctx = StepContext(run_dir=tmp_path, config=preset("tiny").with_overrides(device="auto"))
    calls = [steps.StepCall(Step(n, make_left, Out, uses_device=d), ctx, {}, "k", None)
             for n, d in (("a", True), ("fig", False), ("b", True))]
    devices = lambda cs: [c.ctx.config.device for c in cs]  # noqa: E731
    assert devices(spread_over_gpus(calls, n_gpus=2)) == ["cuda:0", "auto", "cuda:1"]
    assert devices(spread_over_gpus(calls, n_gpus=1)) == ["auto"] * 3  # one GPU: shared
    pinned = [steps.StepCall(c.step, StepContext(run_dir=tmp_path, config=ctx.config.with_overrides(device="cuda:1")),
                             {}, "k", None) for c in calls]
    assert devices(spread_over_gpus(pinned, n_gpus=4)) == ["cuda:1"] * 3  # a device the user chose stays


def _fork_flow(run_dir: str, runner):
    """A flow that runs FORK with the Prefect group executor on ``runner``."""
    from prefect import flow

    @flow(name="fork", task_runner=runner)
    def fork_flow():
        return run_plan(FORK, StepContext(run_dir=Path(run_dir), config=preset("tiny")),
                        execute=steps.execute_with_prefect, run_together=steps.submit_with_prefect)

    return fork_flow


def _pids(run_dir: Path) -> set[int]:
    return {int((run_dir / f"{n}.started").read_text()) for n in ("left", "right")}


def _fork_on(runner, tmp_path: Path, name: str):
    """FORK once sequentially, then on ``runner`` in ``tmp_path/name``: (that run dir, the runner's PlanRun),
    after checking both give the same results and step records."""
    sequential = _run(tmp_path / "sequential", plan=FORK)
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "expect_partner").write_text("")
    concurrent = _fork_flow(str(run_dir), runner)()
    assert {k: v.result for k, v in concurrent.outcomes.items()} == {k: v.result for k, v in sequential.outcomes.items()}
    _same_records(tmp_path / "sequential", run_dir, ["first", "left", "right", "join"])
    return run_dir, concurrent


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_prefect_submits_independent_steps_to_the_flows_process_pool(tmp_path):
    """What a CUDA run does with the trainings: one process each (the augment flow's task runner)."""
    import os

    from tasks.engine.concurrency import step_task_runner

    run_dir, _ = _fork_on(step_task_runner(), tmp_path, "pool")
    pids = _pids(run_dir)
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, at the same time
    again = _fork_flow(str(run_dir), step_task_runner())()
    assert again.cached == ["first", "left", "right", "join"]  # served here, without starting processes


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_dask_cluster_of_two_local_workers_runs_them_too(tmp_path):
    """For users who outgrow one machine: the same flow on prefect-dask's DaskTaskRunner."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    run_dir, _ = _fork_on(runner, tmp_path, "dask")
    assert len(_pids(run_dir)) == 2


@pytest.mark.usefixtures("prefect_harness")
def test_a_gpu_slot_needs_no_limit_and_honours_one_that_exists():
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.engine.device_slots import device_slot, limit_slot

    lines: list[str] = []
    with device_slot("cpu", log=lines.append):  # nothing to hold on a CPU
        pass
    with limit_slot("brvo-test-missing", log=lines.append):
        pass
    with limit_slot("brvo-test-missing", log=lines.append):
        pass
    assert len(lines) == 1 and "prefect gcl create brvo-test-missing" in lines[0]  # said once, no setup needed

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="brvo-test-one", limit=1))
    order: list[str] = []
    held = threading.Event()

    def holder():
        with limit_slot("brvo-test-one"):
            order.append("first in")
            held.set()
            time.sleep(1.5)
            order.append("first out")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    with limit_slot("brvo-test-one"):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]  # the second waited for the slot
