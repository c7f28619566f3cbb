"""The step table: every pipeline step declared once, and the one driver that runs a plan of them.

A :class:`Step` names its plain function, the upstream steps whose results it takes
(``needs``), the files it owns (``writes``, names of :class:`storage.run_dir.RunPaths`
attributes), the config fields its result depends on, and the report section its result
fills. Flows (augment, prepare, retrain) and the single-step CLI commands are plans: an
ordered tuple of steps handed to :func:`run_plan`.

Why the driver caches itself instead of using Prefect's result cache. A step is served
from its record (RUN_DIR/.steps/<name>.json) only when all of this holds:

* the record's key equals the key of this run: the step's name, the *code* that computes
  it (the sources of its module and of every project module it imports, transitively:
  :func:`code_fingerprint`), the config fields it declares, the content fingerprint of the
  input source (for steps that read it) and the recorded digests of every upstream
  step's outputs (so a retrained model, a re-preprocessed soul.h5 or a registry version
  changes every step downstream of it);
* every file the record lists as an output still holds the bytes (sha256) it had when the
  step wrote it, checked on every cache hit: a deleted, replaced or damaged output
  recomputes the step, even when its size and mtime are as recorded.

Prefect's cache policies see task parameters, not the files a step reads and writes, and
keep their records apart from the outputs; here the record sits beside what it
describes, deleting a run directory deletes its cache, and the same logic runs in plain
Python (tests, CLI) and under Prefect, where a served step finishes in a ``Cached`` state.
The records also hold each step's result, so report.json is rebuilt from them at the end of
every run and is nobody's input.

Independent steps at once. Given ``run_together``, :func:`run_plan` hands each run of
consecutive steps whose needs are all met (e.g. the two trainings after preprocess) to it as
one group; every other step, and every step when it is None, runs alone in plan order. Under
Prefect, :func:`submit_with_prefect` submits a group to the flow's task runner (``task.submit``),
so the runner decides where the steps run: processes, threads or a Dask cluster. Who turns this
on, and for which device, is tasks.concurrency's business (on CUDA only: on the CPU the order
stays sequential and bit-reproducible).
"""
from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import importlib.util
import inspect
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel, ValidationError

from storage.atomic import write_json_atomic
from storage.errors import BrvoError
from storage.hashing import canonical_json, file_sha256
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.reporting import LogFn, run_log

#: Packages whose modules count as "the code of a step" when imported by it.
PROJECT_PACKAGES = ("flows", "tasks", "brvo_models", "storage", "deployments")
#: Imported by nearly every step but unable to change a step's result: the config schemas (the
#: values a step uses enter its key through its declared config fields), the logging bridge, and
#: this driver. Leaving them out keeps, e.g., a new config field from retraining every model.
RESULT_NEUTRAL_MODULES = frozenset({"tasks.config", "brvo_models.configs", "tasks.reporting", "tasks.steps"})
RECORD_VERSION = 1


# --------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class StepContext:
    """What every step function receives besides its upstream results."""

    run_dir: Path
    config: PipelineConfig
    source: Path | None = None  # the SOUL directory or manifest CSV (steps with reads_source)
    log: LogFn = run_log
    key: str = ""  # the running step's cache key (set by the driver for each step)

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.run_dir)


@dataclass(frozen=True)
class Step:
    """One pipeline step, declared once.

    ``run(ctx, **needs)`` is the plain step function: it receives a :class:`StepContext` and
    one keyword argument per name in ``needs`` (that step's result) and returns a pydantic
    ``result_type``. ``writes`` are the RunPaths attributes of the files (or directories) it
    owns; a result may list further files in an ``output_files()`` method (e.g. checkpoints
    held outside the run directory by the model registry). ``config_fields`` are the
    PipelineConfig fields its result depends on (dotted for a model's field, e.g.
    ``pix2pix.threshold``). ``report`` is the report.json section its result's
    ``report_section()`` fills. ``cache`` False: the step always runs (cheap steps whose
    outputs are views of other results, e.g. the documents).
    """

    name: str
    run: Callable[..., BaseModel]
    result_type: type[BaseModel]
    needs: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    config_fields: tuple[str, ...] = ()
    reads_source: bool = False
    report: str | None = None
    cache: bool = True
    retries: int = 0
    description: str = ""
    uses_device: bool = False  # trains on the run's device: holds a GPU slot (tasks.concurrency) there

    def config_slice(self, config: PipelineConfig) -> dict[str, Any]:
        data = config.model_dump(mode="json")
        out: dict[str, Any] = {}
        for name in self.config_fields:
            value: Any = data
            for part in name.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise KeyError(f"step {self.name!r} declares unknown config field {name!r}")
                value = value[part]
            out[name] = value
        return out

    def output_paths(self, paths: RunPaths) -> list[Path]:
        return [getattr(paths, attr) for attr in self.writes]


# --------------------------------------------------------------------------------- code identity


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


def _runtime_nodes(tree: ast.AST):
    """Every node of a module except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


@lru_cache(maxsize=None)
def _imports_of(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """Project modules a source file imports anywhere in it (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if _is_project(name) and _module_file(name) is not None:
                found.add(name)
    return tuple(sorted(found))


def module_closure(root: str) -> dict[str, Path]:
    """``root`` and every project module it imports, transitively (result-neutral modules left out)."""
    seen: dict[str, Path] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or (name != root and name in RESULT_NEUTRAL_MODULES):
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        stack.extend(_imports_of(path, path.stat().st_mtime_ns))
    return seen


def code_fingerprint(fn: Callable[..., Any]) -> str:
    """sha256 over the sources of ``fn``'s module and every project module it imports.

    A change to any line that can change the step's result (the step, the model it trains,
    the metrics it reports, the format it writes) changes the fingerprint, and so the key.
    """
    fn = inspect.unwrap(fn)
    h = hashlib.sha256()
    for name, path in sorted(module_closure(fn.__module__).items()):
        h.update(f"{name}:{_cached_sha(str(path), *_stat(path))}\n".encode())
    h.update(f"{fn.__module__}.{fn.__qualname__}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------- file stamps


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=4096)
def _cached_sha(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a source file, remembered per (path, size, mtime) for the life of the process.
    For code fingerprints only: a step's outputs are hashed afresh (see :func:`unchanged`)."""
    return file_sha256(path)


class FileStamp(BaseModel):
    """A file's (or directory's) identity when its step wrote it."""

    size: int
    mtime_ns: int
    sha256: str


def stamp(path: Path) -> FileStamp:
    """Stamp a file by its bytes, a directory by the names and bytes of the files below it."""
    if path.is_dir():
        h = hashlib.sha256()
        newest = 0
        total = 0
        for p in sorted(path.rglob("*")):
            if p.is_file():
                size, mtime = _stat(p)
                total += size
                newest = max(newest, mtime)
                h.update(f"{p.relative_to(path)}|{size}|{file_sha256(p)}\n".encode())
        return FileStamp(size=total, mtime_ns=newest, sha256=h.hexdigest())
    size, mtime = _stat(path)
    return FileStamp(size=size, mtime_ns=mtime, sha256=file_sha256(path))


def unchanged(path: Path, recorded: FileStamp) -> bool:
    """The output still holds the bytes its step wrote.

    Always by content: a damaged disk block or a copy that keeps the timestamps leaves size and
    mtime as they were, and serving the step would keep the damage forever. Nothing remembers a
    digest by stat (an lru_cache keyed on size and mtime would serve the digest of the bytes as
    first written). A different size needs no hash.
    """
    if not path.exists():
        return False
    if not path.is_dir() and path.stat().st_size != recorded.size:
        return False
    return stamp(path).sha256 == recorded.sha256


# --------------------------------------------------------------------------------- records


class StepRecord(BaseModel):
    """RUN_DIR/.steps/<step>.json: what a step's last successful run computed and wrote."""

    version: int = RECORD_VERSION
    step: str
    key: str
    result: dict[str, Any]
    outputs: dict[str, FileStamp]
    seconds: float
    finished_utc: str


def _record_path(paths: RunPaths, step: str) -> Path:
    return paths.step_records / f"{step}.json"


def read_record(paths: RunPaths, step: str) -> StepRecord | None:
    path = _record_path(paths, step)
    if not path.exists():
        return None
    try:
        record = StepRecord.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError):
        return None  # unreadable or from another record version: the step recomputes
    return record if record.version == RECORD_VERSION else None


def _output_key(paths: RunPaths, path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(paths.root.resolve()))
    except ValueError:
        return str(path.resolve())


def _resolve_output(paths: RunPaths, key: str) -> Path:
    p = Path(key)
    return p if p.is_absolute() else paths.root / p


def outputs_intact(paths: RunPaths, record: StepRecord) -> bool:
    return all(unchanged(_resolve_output(paths, k), v) for k, v in record.outputs.items())


def load_result(step: Step, record: StepRecord) -> BaseModel:
    return step.result_type.model_validate(record.result)


def claim_partial_work(directory: Path, ctx: StepContext) -> None:
    """Let a step resume from partial work in ``directory`` (e.g. checkpoints) only when that work
    was made for this step's current key; otherwise remove it, so a resume can never continue
    training on other data, config or code. Writes ``directory/claimed_by.json``."""
    import json
    import shutil

    marker = directory / "claimed_by.json"
    owner = None
    if marker.exists():
        try:
            owner = json.loads(marker.read_text()).get("key")
        except (ValueError, OSError):
            owner = None
    if owner == ctx.key and ctx.key:
        return
    if directory.exists() and any(p.name != marker.name for p in directory.iterdir()):
        ctx.log(f"{directory.name}: the files there were made for other inputs, config or code; starting over")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"key": ctx.key})


# --------------------------------------------------------------------------------- keys


def step_key(step: Step, ctx: StepContext, upstream_records: Mapping[str, StepRecord],
             source_digest: str | None = None) -> str:
    """The identity of what ``step`` would compute now (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"step={step.name}\ncode={code_fingerprint(step.run)}\n".encode())
    h.update(f"config={canonical_json(step.config_slice(ctx.config))}\n".encode())
    if step.reads_source:
        h.update(f"source={source_digest}\n".encode())
    for name in step.needs:
        record = upstream_records[name]
        outputs = {k: v.sha256 for k, v in sorted(record.outputs.items())}
        h.update(f"need={name}:{record.key}:{canonical_json(outputs)}\n".encode())
    return h.hexdigest()[:32]


def source_digest(ctx: StepContext) -> str:
    """Content fingerprint of the input source, with hashes cached by (size, mtime) in the run dir."""
    from storage.fingerprint import fingerprint_source

    if ctx.source is None:
        raise BrvoError("this step reads the input source, but no SOUL directory or manifest was given")
    return fingerprint_source(ctx.source, cache_path=ctx.paths.step_records / "source_hashes.json").digest


# --------------------------------------------------------------------------------- running


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
    """Run the step function, then record its result and stamp its outputs."""
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
        outputs[_output_key(paths, path)] = stamp(path)
    record = StepRecord(step=step.name, key=key, result=result.model_dump(mode="json"), outputs=outputs,
                        seconds=round(seconds, 3),
                        finished_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(_record_path(paths, step.name), record.model_dump(mode="json"))
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
                                f"run it first (brvo-augment {step.name.replace('_', '-')} ...)")
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


def assert_valid_plan(plan: Sequence[Step], config: PipelineConfig | None = None) -> None:
    """Declarations that cannot work: unknown RunPaths attributes or config fields, needs out of order."""
    config = config or PipelineConfig()
    seen: set[str] = set()
    for step in plan:
        for attr in step.writes:
            if not hasattr(RunPaths, attr):
                raise ValueError(f"step {step.name!r} writes unknown RunPaths attribute {attr!r}")
        step.config_slice(config)
        if not set(step.needs) <= seen:
            raise ValueError(f"step {step.name!r} needs {sorted(set(step.needs) - seen)} before it")
        seen.add(step.name)


# --------------------------------------------------------------------------------- Prefect


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
                                 message=f"served from {_record_path(context.paths, step.name).name} "
                                         f"(computed {record.finished_utc} in {record.seconds:.1f} s)")
        if step.uses_device:
            from tasks.concurrency import device_slot

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
