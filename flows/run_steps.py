"""The one way a command runs steps in a run directory: under its lock, with run.json and the documents.

:func:`run_steps` is what the flows (augment, prepare, retrain) and the single-step CLI commands go
through: it holds RUN_DIR/.lock for the whole run, records the config in run.json, runs the plan with
the step engine's driver (tasks.engine.driver.run_plan) and rebuilds report.json / report.md from the
step results (tasks.rendering.report).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from storage.locking import run_dir_lock
from tasks.config import PipelineConfig
from tasks.engine import Executor, PlanRun, Step, StepContext, execute_with_prefect, run_plan
from tasks.engine.concurrency import group_executor
from tasks.engine.logs import install_one_line_errors
from tasks.engine.run_record import record_run
from tasks.rendering.report import write_documents

#: How long a command waits for another command's RUN_DIR/.lock before it fails with a clear message.
LOCK_WAIT_S = 5.0


def run_steps(plan: Sequence[Step], run_dir: str | Path, config: PipelineConfig, *, source: str | Path | None = None,
              only: Iterable[str] | None = None, execute: Executor = execute_with_prefect,
              lock_wait_s: float = LOCK_WAIT_S, log_warnings: bool = True) -> PlanRun:
    """Run ``plan`` (or just the steps in ``only``) in ``run_dir`` under its lock; write the documents
    (``run.report`` is the report.json written; ``log_warnings`` False leaves its WARNINGs to the
    caller) and record every output's sha256 in run.json.

    Steps that need nothing from each other run at once where the config says so (on CUDA by
    default: tasks.engine.concurrency), else one after another in plan order. A step's expected error
    (a BrvoError) is one line in the Prefect run log, as on the console."""
    install_one_line_errors()
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
