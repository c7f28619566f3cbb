"""The two models a run uses, as one result type: trained in the run directory, or taken from the registry.

Fill, label, score and export take a :class:`TrainedModel` from the 'pix2pix' and 'crgan'
steps and never ask where it came from; the checkpoint path, its sha256 and its held-out
evaluation travel with it (flows/augment.py decides where the models come from).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel

from storage.errors import BrvoError
from storage.report_schema import CrganSection, Pix2PixSection
from tasks.config import PipelineConfig
from tasks.shared.progress import training_progress
from tasks.engine import StepContext, claim_partial_work

ModelName = Literal["pix2pix", "crgan"]


class TrainedModel(BaseModel):
    """A model checkpoint a run uses, how it was made, and its held-out evaluation (a report section)."""

    model: ModelName
    checkpoint: str
    sha256: str
    image_size: int
    registry_version: str | None = None
    training: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint)

    @property
    def origin(self) -> str:
        return f"registry version {self.registry_version}" if self.registry_version else "trained in this run"

    def output_files(self) -> list[Path]:
        return [self.checkpoint_path]

    def report_section(self) -> Pix2PixSection | CrganSection:
        section = dict(self.evaluation)
        if self.registry_version:
            section["registry_version"] = self.registry_version
        if self.training:
            section["training"] = {k: v for k, v in self.training.items() if k != "history"}
        return (Pix2PixSection if self.model == "pix2pix" else CrganSection).model_validate(section)


def train_and_evaluate(ctx: StepContext, model: ModelName, train: Callable[..., Any],
                       evaluate: Callable[..., dict[str, Any]], soul_h5: str | Path) -> TrainedModel:
    """What both training steps do: claim the checkpoints for this step's key (a resume never continues
    work made for other inputs, config or code), train on ``soul_h5`` with live progress in the UI,
    evaluate held out."""
    claim_partial_work(ctx.paths.checkpoints(model), ctx)
    with allocation_failures_as_one_line(model, ctx.config):
        result = train(ctx.run_dir, ctx.config, log=ctx.log, on_validation=training_progress(model), soul_h5=soul_h5)
        evaluation = evaluate(ctx.run_dir, ctx.config, log=ctx.log, soul_h5=soul_h5)
    return TrainedModel(model=model, checkpoint=result.best_path, sha256=result.best_sha256,
                        image_size=ctx.config.image_size, training=result.model_dump(), evaluation=evaluation)


#: How torch's CPU and CUDA allocators word a failed allocation (torch.OutOfMemoryError is a RuntimeError).
_ALLOCATION_FAILURE = re.compile(r"can't allocate memory|not enough memory|out of memory|failed to allocate",
                                 re.IGNORECASE)


@contextlib.contextmanager
def allocation_failures_as_one_line(model: ModelName, config: PipelineConfig) -> Iterator[None]:
    """A model too big for the machine (widths and batch within their config ranges) is a one-line
    BrvoError naming the knobs that size it, not the allocator's traceback; other errors pass."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not isinstance(exc, MemoryError) and not _ALLOCATION_FAILURE.search(str(exc)):
            raise
        section = getattr(config, model)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BrvoError(f"{model}: out of memory ({detail}); lower {model}.ngf / {model}.ndf (now {section.ngf} / "
                        f"{section.ndf}), {model}.batch_size (now {section.batch_size}) or image_size (now "
                        f"{config.image_size}), or run on a machine with more memory") from None
