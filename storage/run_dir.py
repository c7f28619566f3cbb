"""Where each step reads and writes inside a run directory: every file name is spelled here, once.

Steps declare their outputs as names of these attributes (tasks.steps.Step.writes) and
pass their results on; nothing else builds a path inside a run directory by hand.
"""
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
    def ingest_json(self) -> Path:
        return self.root / "ingest.json"

    @property
    def pix2pix_checkpoint(self) -> Path:
        """The Pix2Pix weights a run labels with (best on validation patients)."""
        return self.checkpoints("pix2pix") / "best.pt"

    @property
    def crgan_checkpoint(self) -> Path:
        """The CRGAN weights a run generates with (best on validation patients)."""
        return self.checkpoints("crgan") / "best.pt"

    @property
    def work(self) -> Path:
        """Intermediate HDF5/CSV files that fill, label and score hand to each other."""
        return self.root / "work"

    @property
    def synthetic_h5(self) -> Path:
        """fill -> label, score, export: the CRGAN samples and their (patient, stage, seed) table."""
        return self.work / "synthetic.h5"

    @property
    def synthetic_labels_h5(self) -> Path:
        """label -> score, export: the Pix2Pix masks of the samples and their confidence."""
        return self.work / "labels.h5"

    @property
    def scores_csv(self) -> Path:
        """score -> export: per-sample scores and the accepted flag."""
        return self.work / "scores.csv"

    @property
    def step_records(self) -> Path:
        """One JSON record per finished step: its cache key, result and output stamps (tasks.steps)."""
        return self.root / ".steps"

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
