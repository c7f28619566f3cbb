"""The two models a run uses, as one result type: trained in the run directory, or taken from the registry.

Fill, label, score and export take a :class:`TrainedModel` from the 'pix2pix' and 'crgan'
steps and never ask where it came from; the checkpoint path, its sha256 and its held-out
evaluation travel with it (flows/augment.py decides where the models come from).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

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

    def report_section(self) -> dict[str, Any]:
        section = dict(self.evaluation)
        if self.registry_version:
            section["registry_version"] = self.registry_version
        if self.training:
            section["training"] = {k: v for k, v in self.training.items() if k != "history"}
        return section
