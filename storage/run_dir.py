"""Where each step reads and writes inside a run directory: every path of the layout is named here once."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> "RunPaths":
        return cls(Path(run_dir))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.csv"

    @property
    def stage_table(self) -> Path:
        return self.root / "stage_counts.csv"

    @property
    def soul_h5(self) -> Path:
        return self.root / "soul.h5"

    @property
    def augmented_h5(self) -> Path:
        return self.root / "augmented.h5"

    def checkpoints(self, model: str) -> Path:
        return self.root / "checkpoints" / model

    @property
    def synthetic_dir(self) -> Path:
        """Intermediate files of fill/label/score (npz/h5 between steps)."""
        return self.root / "work"

    @property
    def dataset_card(self) -> Path:
        return self.root / "DATASET_CARD.md"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"


def read_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = RunPaths.of(run_dir).report_json
    return json.loads(path.read_text()) if path.exists() else {}


def update_report(run_dir: str | os.PathLike, section: str, value: Any) -> dict[str, Any]:
    """Set ``report.json[section] = value`` (atomic read-modify-write) and return the whole report."""
    report = read_report(run_dir)
    report[section] = value
    write_json_atomic(RunPaths.of(run_dir).report_json, report)
    return report
