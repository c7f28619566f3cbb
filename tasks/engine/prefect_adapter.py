"""Steps as Prefect task runs: a task run per step, named after it, ``Cached`` when served from its record.

The step logic stays a plain function; this module only wraps it, so the same driver runs in plain
Python (tests, sub-runs) and under Prefect (flows, CLI), where independent steps can go to the
flow's task runner together (:func:`submit_with_prefect`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence

from pydantic import BaseModel

from storage.errors import BrvoError
from tasks.engine.driver import StepCall, StepOutcome, compute_step
from tasks.engine.records import StepRecord, load_result, read_record, record_path
from tasks.engine.step import Step, StepContext


def retry_io_errors(task_obj, task_run, state) -> bool:
    """Retry I/O hiccups only: bad input or bad state (a BrvoError) and bugs fail the same way twice."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, BrvoError)


@lru_cache(maxsize=None)
def prefect_task(step: Step):
    """The Prefect task of a step: a task run per step, named after it, ``Cached`` when served
    from its record. Upstream results go in as the ``needs`` parameter, so the flow graph in
    the UI draws each step's real dependencies (fill, label and score on the trained models)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Completed

    def body(context: StepContext, needs: dict[str, BaseModel], key: str, served: bool):
        if served:
            record = read_record(context.paths, step.name)
            if record is not None and record.key == key:
                return Completed(data=load_result(step, record), name="Cached",
                                 message=f"served from {record_path(context.paths, step.name).name} "
                                         f"(computed {record.finished_utc} in {record.seconds:.1f} s)")
        if step.uses_device:
            from tasks.engine.device_slots import device_slot

            with device_slot(context.config.device, log=context.log):
                return compute_step(step, context, needs, key).result
        return compute_step(step, context, needs, key).result

    body.__name__ = body.__qualname__ = step.name
    return task(name=step.name.replace("_", "-"), description=step.description or None, cache_policy=NO_CACHE,
                persist_result=False, retries=step.retries, retry_delay_seconds=2,
                retry_condition_fn=retry_io_errors if step.retries else None)(body)


def execute_with_prefect(step: Step, ctx: StepContext, upstream: Mapping[str, BaseModel], key: str,
                         record: StepRecord | None) -> StepOutcome:
    """Run (or serve) the step as a Prefect task run; a failed step re-raises its error."""
    state = prefect_task(step)(ctx, dict(upstream), key, record is not None, return_state=True)
    return _outcome_of(step, ctx, key, state)


def submit_with_prefect(calls: Sequence[StepCall]) -> list[StepOutcome]:
    """A :data:`GroupExecutor`: submit the calls that compute to the flow's task runner (``task.submit``),
    then wait for all; the runner decides where they run (the augment flow's: a process each). Calls
    served from their records, and a group with one step left to compute, run here as
    :func:`execute_with_prefect` runs them; so does everything outside a flow run (no runner there)."""
    from prefect.context import FlowRunContext

    computing = [c for c in calls if c.record is None]
    if FlowRunContext.get() is None or len(computing) < 2:
        return [call.run(execute_with_prefect) for call in calls]
    with _api_shared_with_workers():
        futures = {id(c): prefect_task(c.step).submit(c.ctx, dict(c.upstream), c.key, False) for c in computing}
    outcomes, errors = [], []
    for call in calls:  # served ones meanwhile, here
        try:
            if id(call) in futures:
                future = futures[id(call)]
                future.wait()
                outcomes.append(_outcome_of(call.step, call.ctx, call.key, future.state))
            else:
                outcomes.append(call.run(execute_with_prefect))
        except BaseException as exc:  # every step finishes before the first failure is raised
            errors.append(exc)
    if errors:
        raise errors[0]
    return outcomes


def _api_shared_with_workers():
    """Settings under which submitted task runs report to this process's Prefect API.

    Without a configured PREFECT_API_URL a process runs an ephemeral API server of its own; a
    task runner's worker processes (process pool, Dask) would each start another one (measured
    here: about 20 s each, sometimes past Prefect's start timeout) and their task runs would land
    in its database, not this flow run's. The submitted context carries these settings, so the
    workers use this process's server instead."""
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        return contextlib.nullcontext()
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    return temporary_settings(updates={PREFECT_API_URL: url})


def _outcome_of(step: Step, ctx: StepContext, key: str, state) -> StepOutcome:
    """The outcome of a finished task run of ``step``: its result (a failure re-raises) and fresh record."""
    result = state.result()
    fresh = read_record(ctx.paths, step.name)
    if fresh is None or fresh.key != key:
        raise RuntimeError(f"step {step.name!r} finished without a record for key {key}")
    cached = state.name == "Cached"
    return StepOutcome(step.name, result, cached=cached, seconds=fresh.seconds, record=fresh)
