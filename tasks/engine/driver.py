"""The one driver that runs a plan of steps: each served from its record when fresh, else computed.

:func:`run_plan` walks a plan (an ordered tuple of :class:`~tasks.engine.step.Step`) in order,
hands each step its upstream results, and records what it computed (tasks.engine.records). How a
step executes is pluggable: plainly (tests, sub-runs) or as a Prefect task run
(tasks.engine.prefect_adapter); consecutive steps that need nothing from each other may go to a
group executor together (tasks.engine.concurrency decides when).
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel

from storage.atomic import write_json_atomic
from storage.errors import BrvoError
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.engine.identity import stamp
from tasks.engine.records import (StepRecord, load_result, output_key, outputs_intact, read_record, record_path,
                                  source_digest, step_key)
from tasks.engine.step import Step, StepContext


@dataclass
class StepOutcome:
    name: str
    result: BaseModel
    cached: bool
    seconds: float  # of the run that computed it (a cached step keeps its original time)
    record: StepRecord


@dataclass
class PlanRun:
    """What :func:`run_plan` did: every step's result, in plan order."""

    outcomes: dict[str, StepOutcome] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # the report.json written from these results

    def result(self, name: str) -> BaseModel:
        return self.outcomes[name].result

    @property
    def results(self) -> dict[str, BaseModel]:
        return {k: v.result for k, v in self.outcomes.items()}

    @property
    def cached(self) -> list[str]:
        return [k for k, v in self.outcomes.items() if v.cached]

    def timings(self) -> dict[str, Any]:
        secs = {k: round(v.seconds, 2) for k, v in self.outcomes.items()}
        return {**secs, "total": round(sum(secs.values()), 2), "cached": self.cached}


def compute_step(step: Step, ctx: StepContext, upstream: Mapping[str, BaseModel], key: str) -> StepOutcome:
    """Run the step function, then record its result and stamp its outputs: a declared input that is not
    there before, or a declared output that is not there after, is the step's bug, never served."""
    absent = [str(p) for p in step.input_paths(ctx.paths) if not p.exists()]
    if absent:
        raise RuntimeError(f"step {step.name!r} declares it reads {', '.join(absent)}, which its needs did not write")
    t0 = time.perf_counter()
    result = step.run(replace(ctx, key=key), **{name: upstream[name] for name in step.needs})
    seconds = time.perf_counter() - t0
    if not isinstance(result, step.result_type):
        raise TypeError(f"step {step.name!r} returned {type(result).__name__}, expected {step.result_type.__name__}")
    paths = ctx.paths
    files = step.output_paths(paths) + [Path(p) for p in getattr(result, "output_files", lambda: [])()]
    outputs = {}
    for path in files:
        if not path.exists():
            raise RuntimeError(f"step {step.name!r} finished without writing {path}")
        outputs[output_key(paths, path)] = stamp(path)
    record = StepRecord(step=step.name, key=key, result=result.model_dump(mode="json"), outputs=outputs,
                        seconds=round(seconds, 3),
                        finished_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(record_path(paths, step.name), record.model_dump(mode="json"))
    return StepOutcome(step.name, result, cached=False, seconds=record.seconds, record=record)


def plan_step(step: Step, ctx: StepContext, records: Mapping[str, StepRecord],
              source: Callable[[], str]) -> tuple[str, StepRecord | None]:
    """(this run's key, the record to serve it from or None when the step must run)."""
    key = step_key(step, ctx, records, source() if step.reads_source else None)
    if not step.cache:
        return key, None
    record = read_record(ctx.paths, step.name)
    if record is not None and record.key == key and outputs_intact(ctx.paths, record):
        return key, record
    return key, None


#: How a plan's steps are executed: plain calls (tests, no Prefect) or Prefect tasks (flows, CLI).
#: ``execute(step, ctx, upstream, key, record)`` returns the step's outcome; ``record`` is the
#: step's fresh record when it can be served, else None.
Executor = Callable[[Step, StepContext, Mapping[str, BaseModel], str, "StepRecord | None"], StepOutcome]


def execute_plainly(step: Step, ctx: StepContext, upstream: Mapping[str, BaseModel], key: str,
                    record: StepRecord | None) -> StepOutcome:
    if record is not None:
        return StepOutcome(step.name, load_result(step, record), cached=True, seconds=record.seconds, record=record)
    return compute_step(step, ctx, upstream, key)


@dataclass(frozen=True)
class StepCall:
    """One step ready to execute: an :data:`Executor`'s arguments, bundled so several can run at once."""

    step: Step
    ctx: StepContext
    upstream: Mapping[str, BaseModel]
    key: str
    record: StepRecord | None

    def run(self, execute: Executor) -> StepOutcome:
        return execute(self.step, self.ctx, self.upstream, self.key, self.record)


#: Runs independent steps at once; returns their outcomes in the calls' order (and raises the
#: first failure, in that order, once every call has finished).
GroupExecutor = Callable[[Sequence[StepCall]], "list[StepOutcome]"]


def run_together_in_threads(calls: Sequence[StepCall], execute: Executor = execute_plainly) -> list[StepOutcome]:
    """A :data:`GroupExecutor` of plain Python: one thread per call (each with a copy of the caller's context
    variables). Threads share the process's global torch RNG, so use it for steps that draw from none
    (tests, I/O-bound steps); under Prefect, prefer the flow's task runner (:func:`submit_with_prefect`)."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="step") as pool:
        futures = [pool.submit(contextvars.copy_context().run, call.run, execute) for call in calls]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def run_plan(plan: Sequence[Step], ctx: StepContext, *, execute: Executor = execute_plainly,
             only: Iterable[str] | None = None, run_together: GroupExecutor | None = None) -> PlanRun:
    """Run ``plan`` in order; each step is served from its record when fresh, else computed.

    ``only``: run just these steps and take every other step's result from its last record
    (a single-step CLI command on a run directory); a missing or stale-on-disk record of such
    an upstream step is a one-line error naming the command that makes it.
    ``run_together``: runs of consecutive steps that need nothing from each other (all their
    needs met before the first of them) go to it as one group; a step alone still goes to
    ``execute``. Results and records are those of the sequential run.
    """
    names = [s.name for s in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate step names in plan: {names}")
    for k, step in enumerate(plan):
        check_reads(step, {s.name: s for s in plan[:k]})
    only = set(only) if only is not None else None
    run = PlanRun()
    records: dict[str, StepRecord] = {}
    digest_cache: list[str] = []

    def source() -> str:
        if not digest_cache:
            digest_cache.append(source_digest(ctx))
        return digest_cache[0]

    def ready(step: Step) -> bool:
        return (only is None or step.name in only) and all(n in run.outcomes for n in step.needs)

    i = 0
    while i < len(plan):
        step = plan[i]
        missing = [n for n in step.needs if n not in run.outcomes]
        if missing:
            raise ValueError(f"step {step.name!r} needs {missing}, which come later in the plan or not at all")
        if only is not None and step.name not in only:
            record = read_record(ctx.paths, step.name)
            if record is None or not outputs_intact(ctx.paths, record):
                raise BrvoError(f"{ctx.run_dir}: no finished '{step.name}' step (or its outputs changed since); "
                                f"run it first ({step.how_to_make(ctx.run_dir)})")
            outcomes = [StepOutcome(step.name, load_result(step, record), True, record.seconds, record)]
        else:
            group = [step]
            while run_together is not None and i + len(group) < len(plan) and ready(plan[i + len(group)]):
                group.append(plan[i + len(group)])
            calls = [StepCall(s, ctx, {n: run.outcomes[n].result for n in s.needs}, *plan_step(s, ctx, records, source))
                     for s in group]
            outcomes = [calls[0].run(execute)] if len(calls) == 1 else run_together(calls)
        for outcome in outcomes:
            run.outcomes[outcome.name] = outcome
            records[outcome.name] = outcome.record
        i += len(outcomes)
    return run


def upstream_of(plan: Sequence[Step], target: str) -> tuple[Step, ...]:
    """``target`` and every step it needs, directly or through others, in plan order."""
    by_name = {s.name: s for s in plan}
    wanted, stack = set(), [target]
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].needs)
    return tuple(s for s in plan if s.name in wanted)


def single_step_plan(plan: Sequence[Step], target: str, paths: RunPaths) -> tuple[Step, ...]:
    """What running ``target`` alone on a run directory runs (with ``only={target}``): the steps it needs,
    whose records must be there, plus the earlier steps of ``plan`` that finished before, so the report
    rebuilt afterwards keeps their sections. A step it does not need is never required."""
    needed = {s.name for s in upstream_of(plan, target)}
    position = [s.name for s in plan].index(target)

    def finished(step: Step) -> bool:
        record = read_record(paths, step.name)
        return record is not None and outputs_intact(paths, record)

    chosen: list[Step] = []
    for i, step in enumerate(plan):
        taken = {s.name for s in chosen}
        if step.name in needed or (i < position and set(step.needs) <= taken and finished(step)):
            chosen.append(step)
    return tuple(chosen)


def check_reads(step: Step, earlier: Mapping[str, Step]) -> None:
    """Every file ``step`` reads is written by one of the steps it needs (``earlier``: the plan's steps
    before it, by name), so the data path is the one its declarations draw."""
    for attr in step.reads:
        if not hasattr(RunPaths, attr):
            raise ValueError(f"step {step.name!r} reads unknown RunPaths attribute {attr!r}")
        writers = [n for n in step.needs if n in earlier and attr in earlier[n].writes]
        if not writers:
            raise ValueError(f"step {step.name!r} reads {attr!r}, which none of its needs {list(step.needs)} writes")


def assert_valid_plan(plan: Sequence[Step], config: PipelineConfig | None = None) -> None:
    """Declarations that cannot work: unknown RunPaths attributes or config fields, needs out of order,
    a read that no needed step writes."""
    config = config or PipelineConfig()
    seen: dict[str, Step] = {}
    for step in plan:
        for attr in step.writes:
            if not hasattr(RunPaths, attr):
                raise ValueError(f"step {step.name!r} writes unknown RunPaths attribute {attr!r}")
        step.config_slice(config)
        if not set(step.needs) <= set(seen):
            raise ValueError(f"step {step.name!r} needs {sorted(set(step.needs) - set(seen))} before it")
        check_reads(step, seen)
        seen[step.name] = step


