"""Bridges from plain step functions to Prefect: logging and progress artifacts.

Step functions take ``log`` (a ``str -> None``) and ``on_progress`` (a callback
with a dict) so they run without Prefect in tests; the @task wrappers pass
:func:`run_log` and a :class:`ProgressArtifact` so the same messages reach the
Prefect run logger and the UI.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from prefect.context import TaskRunContext, FlowRunContext

LogFn = Callable[[str], None]

_fallback = logging.getLogger("brvo_augment")


def in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def run_log(message: str) -> None:
    """Log to the Prefect run logger inside a run, else to the 'brvo_augment' logger."""
    if in_prefect_run():
        from prefect import get_run_logger

        get_run_logger().info(message)
    else:
        _fallback.info(message)


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


def training_progress(key: str, description: str) -> Callable[[dict[str, float]], None]:
    """An ``on_validation`` callback for :func:`brvo_models.training.fit` that moves a progress artifact
    to the step reached out of the schedule's budget (fit already logs each validation through ``run_log``)."""
    progress = ProgressArtifact(key, description)
    return lambda row: progress(row["step"], row["total_steps"])
