"""Bridges from plain step functions to Prefect: logging and progress artifacts.

Step functions take ``log`` (a ``str -> None``) and ``on_progress`` (a callback
with a dict) so they run without Prefect in tests; the @task wrappers pass
:func:`run_log` and a :class:`ProgressArtifact` so the same messages reach the
Prefect run logger and the UI.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from prefect.context import FlowRunContext, TaskRunContext

LogFn = Callable[[str], None]

_fallback = logging.getLogger("brvo_augment")


def in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def run_log(message: str, level: int = logging.INFO) -> None:
    """Log to the Prefect run logger inside a run, else to the 'brvo_augment' logger."""
    if in_prefect_run():
        from prefect import get_run_logger

        get_run_logger().log(level, message)
    else:
        _fallback.log(level, message)


def run_warning(message: str) -> None:
    """A WARNING where a user looks: the run's log (Prefect UI, console); for missed quality bars."""
    run_log(message, logging.WARNING)


class OneLineExpectedErrors(logging.Filter):
    """Drop the traceback from Prefect's log records of expected errors (a BrvoError: bad input, a busy
    run directory, a refused checkpoint), so the run log shows the one-line message the CLI prints;
    unexpected errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from storage.errors import BrvoError

        if record.exc_info and isinstance(record.exc_info[1], BrvoError):
            record.exc_info = None
            record.exc_text = None
        return True


#: Prefect's engine loggers of task and flow runs.
PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def install_one_line_errors() -> None:
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineExpectedErrors) for f in logger.filters):
            logger.addFilter(OneLineExpectedErrors())


install_one_line_errors()


class ProgressArtifact:
    """A Prefect progress artifact (0-100 %) plus a log line per update; a no-op outside a run."""

    def __init__(self, key: str, description: str) -> None:
        self.key = key
        self.description = description
        self._id = None

    def __call__(self, done: float, total: float, message: str = "", **fields: Any) -> None:
        percent = 100.0 * done / max(total, 1e-9)
        if message:
            run_log(message)
        if not in_prefect_run():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._id is None:
            self._id = create_progress_artifact(progress=percent, key=self.key, description=self.description)
        else:
            update_progress_artifact(self._id, progress=percent)


def epoch_progress(key: str, description: str, epochs: int) -> Callable[[dict[str, float]], None]:
    """An ``on_epoch`` callback for :func:`brvo_models.training.fit` that moves a progress artifact
    (fit already logs each epoch's line through ``run_log``)."""
    progress = ProgressArtifact(key, description)
    return lambda row: progress(row["epoch"], epochs)
