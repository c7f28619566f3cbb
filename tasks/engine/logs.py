"""Logging from plain step functions: to the Prefect run logger inside a run, else to 'brvo_augment'.

Step functions take ``log`` (a ``str -> None``) so they run without Prefect; the engine hands them
:func:`run_log`. :func:`install_one_line_errors` is called where a flow or the CLI starts, never
on import.
"""
from __future__ import annotations

import logging
from typing import Callable

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



