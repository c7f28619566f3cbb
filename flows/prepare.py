"""The 'prepare' flow (ingest -> preprocess), and the one way any command runs steps in a run directory.

:func:`run_steps` is what every command that writes into a run directory goes through (the
flows and the single-step CLI commands alike): it holds RUN_DIR/.lock for the whole run,
records the config in run.json, runs the plan through the step table's driver, and
rebuilds report.json/report.md from the step results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from prefect import flow

from storage.locking import run_dir_lock
from tasks.concurrency import group_executor
from tasks.config import PipelineConfig, parse_config
from tasks.ingest import INGEST
from tasks.preprocess import PREPROCESS
from tasks.report import write_documents
from tasks.run_record import record_run
from tasks.steps import (
    Executor,
    PlanRun,
    Step,
    StepContext,
    execute_with_prefect,
    run_plan,
)

PREPARE: tuple[Step, ...] = (INGEST, PREPROCESS)
LOCK_WAIT_S = 5.0


def run_steps(plan: Sequence[Step], run_dir: str | Path, config: PipelineConfig, *, source: str | Path | None = None,
              only: Iterable[str] | None = None, execute: Executor = execute_with_prefect,
              lock_wait_s: float = LOCK_WAIT_S, log_warnings: bool = True) -> PlanRun:
    """Run ``plan`` (or just the steps in ``only``) in ``run_dir`` under its lock; write the documents
    (``run.report`` is the report.json written; ``log_warnings`` False leaves its WARNINGs to the
    caller) and record every output's sha256 in run.json.

    Steps that need nothing from each other run at once where the config says so (on CUDA by
    default: tasks.concurrency), else one after another in plan order."""
    run_dir = Path(run_dir).resolve()
    source = Path(source).resolve() if source is not None else None
    with run_dir_lock(run_dir, timeout_s=lock_wait_s):
        record_run(run_dir, config, **({"soul_dir": str(source)} if source is not None else {}))
        run = run_plan(plan, StepContext(run_dir=run_dir, config=config, source=source), execute=execute, only=only,
                       run_together=group_executor(config, execute))
        run.report = write_documents(run_dir, plan, run, config, str(source) if source is not None else "",
                                     log_warnings=log_warnings)
        record_run(run_dir, config, hashes={path: stamp.sha256 for outcome in run.outcomes.values()
                                            for path, stamp in outcome.record.outputs.items()})
    return run


@flow(name="prepare", log_prints=True)
def prepare(soul_dir: str, run_dir: str, config_json: str | None = None) -> dict:
    """SOUL directory (or manifest CSV) -> RUN_DIR/manifest.csv, quarantine.csv, soul.h5."""
    config = parse_config(config_json) if config_json else PipelineConfig()
    run = run_steps(PREPARE, run_dir, config, source=soul_dir)
    return {name: result.model_dump(mode="json") for name, result in run.results.items()}
