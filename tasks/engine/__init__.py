"""The step engine: how a step is declared, run, cached and wrapped for Prefect. It knows no step.

step (Step, StepContext) -> identity (code fingerprint, file stamps) -> records (cache keys, records)
-> driver (run_plan) -> prefect_adapter (task runs) -> concurrency / device_slots (steps at once, GPU
slots); logs (the logging bridge) and run_record (RUN_DIR/run.json) beside them. docs/design.md
walks through it.
"""
from tasks.engine.driver import (Executor, GroupExecutor, PlanRun, StepCall, StepOutcome, assert_valid_plan,
                                 compute_step, execute_plainly, plan_step, run_plan, run_together_in_threads,
                                 single_step_plan, upstream_of)
from tasks.engine.identity import (PROJECT_PACKAGES, RESULT_NEUTRAL_MODULES, FileStamp, code_fingerprint,
                                   is_result_neutral, module_closure, stamp, unchanged)
from tasks.engine.logs import LogFn, in_prefect_run, run_log, run_warning
from tasks.engine.prefect_adapter import execute_with_prefect, prefect_task, retry_io_errors, submit_with_prefect
from tasks.engine.records import (RECORD_VERSION, StepRecord, claim_partial_work, load_result, outputs_intact,
                                  read_record, record_path, source_digest, step_key)
from tasks.engine.step import Step, StepCommand, StepContext

__all__ = ["Executor", "FileStamp", "GroupExecutor", "LogFn", "PROJECT_PACKAGES", "PlanRun", "RECORD_VERSION",
           "RESULT_NEUTRAL_MODULES", "Step", "StepCall", "StepCommand", "StepContext", "StepOutcome", "StepRecord",
           "assert_valid_plan", "claim_partial_work", "code_fingerprint", "compute_step", "execute_plainly",
           "execute_with_prefect", "in_prefect_run", "is_result_neutral", "load_result", "module_closure",
           "outputs_intact", "plan_step", "prefect_task", "read_record", "record_path", "retry_io_errors",
           "run_log", "run_plan", "run_together_in_threads", "run_warning", "single_step_plan", "source_digest", "stamp", "step_key",
           "submit_with_prefect", "unchanged", "upstream_of"]
