"""Live progress of a step in the Prefect UI: a progress artifact, and a training's latest validations."""
from __future__ import annotations

import time
from typing import Any

from tasks.engine.logs import in_prefect_run, run_log


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


class TrainingProgress:
    """The ``on_validation`` callback of a training step: a progress artifact and a live table in the UI.

    :func:`brvo_models.training.fit` calls it after every validation with that row (step, the
    schedule's total_steps, losses, val scores, seconds). The markdown artifact ``<model>-training``
    shows the latest rows and the best
    validation score so far, republished at most every ``every_s`` seconds (and on the last row),
    so a long GPU run can be followed from the Prefect UI without an artifact version per step.
    Outside a Prefect run it does nothing (fit logs each row anyway).
    """

    def __init__(self, model: str, *, clock: str = "step", total: str = "total_steps", score: str = "val_score",
                 every_s: float = 10.0, rows_shown: int = 12) -> None:
        self.model, self.clock, self.total_key, self.score = model, clock, total, score
        self.total = float("nan")
        self.every_s, self.rows_shown = every_s, rows_shown
        self.rows: list[dict[str, float]] = []
        self.progress = ProgressArtifact(f"{model}-training-progress", f"{model} training: {clock}s done")
        self._last_publish = float("-inf")

    def __call__(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))
        done = float(row.get(self.clock, len(self.rows)))
        self.total = float(row.get(self.total_key, done))
        self.progress(done, self.total)
        if not in_prefect_run():
            return
        now = time.monotonic()
        if now - self._last_publish >= self.every_s or done >= self.total:
            self._last_publish = now
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(key=f"{self.model}-training", markdown=self.markdown(),
                                     description=f"{self.model} training, live: latest validations and best so far")

    def markdown(self) -> str:
        best = max(self.rows, key=lambda r: r.get(self.score, float("-inf")))
        # bookkeeping the header line already says (or nobody follows live) stays out, so the table fits the page
        hidden = (self.clock, self.total_key, "seconds", "epoch", "seconds_validating", "lr_factor")
        columns = [self.clock] + [k for k in self.rows[-1] if k not in hidden] + ["seconds"]
        from tasks.shared.markdown_tables import markdown_table

        rows = [[_num(r.get(c)) for c in columns] for r in self.rows[-self.rows_shown:]]
        for r, row in zip(self.rows[-self.rows_shown:], rows):
            if r is best:
                row[-1] += " **best**"
        return "\n".join([f"# {self.model} training", "",
                          f"{self.clock} {_num(self.rows[-1].get(self.clock))} of {_num(self.total)}; best "
                          f"{self.score} {_num(best.get(self.score))} at {self.clock} {_num(best.get(self.clock))} "
                          "(the checkpoint kept)", "", markdown_table(columns, rows)]) + "\n"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def training_progress(model: str) -> TrainingProgress:
    """The ``on_validation`` callback a training step hands to :func:`brvo_models.training.fit`."""
    return TrainingProgress(model)
