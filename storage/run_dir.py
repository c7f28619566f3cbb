"""Where each step reads and writes inside a run directory: every file name is spelled here, once.

Steps declare their outputs as names of these attributes (tasks.engine.Step.writes) and
pass their results on; nothing else builds a path inside a run directory by hand.

Every path built from text that is not ours (a patient id from a manifest, a file stem,
a version name) goes through :func:`safe_component`, and the result is checked with
:meth:`RunPaths.inside` (or :func:`ensure_inside`) to stay under its root: a patient id
like ``/../../../tmp/x/ESCAPED`` must never name a file outside the run directory.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import UnsafePathError
from storage.report_schema import load_report

#: longest component safe_component returns, in UTF-8 bytes (file systems allow 255)
MAX_COMPONENT_BYTES = 120
_KEPT_PUNCTUATION = "-_"


def safe_component(text: str) -> str:
    """One file-name component derived from ``text``, safe to join under a folder.

    Letters and digits of any script, '-' and '_' are kept (NFC-normalised), so plain
    ids keep their name (``001`` -> ``001``, ``Zoë`` -> ``Zoë``); anything else (path
    separators, dots, spaces, control characters, emoji) becomes '_'. When the text had
    to change, was empty or was too long, a short hash of the original is appended, so
    two different ids never share a file (``a/b`` -> ``a_b-3a1f...``, ``a_b`` -> ``a_b``).
    The result is never empty, '.', '..' or hidden, and at most MAX_COMPONENT_BYTES long.
    """
    text = str(text)
    normalised = unicodedata.normalize("NFC", text)
    kept = "".join(ch if (ch.isalnum() or ch in _KEPT_PUNCTUATION) else "_" for ch in normalised)
    limit = MAX_COMPONENT_BYTES - 9  # room for '-' and 8 hex digits
    if kept == text and kept and len(kept.encode("utf-8")) <= MAX_COMPONENT_BYTES:
        return kept
    while len(kept.encode("utf-8")) > limit:
        kept = kept[:-1]
    tag = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{kept}-{tag}" if kept else tag


def ensure_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves (symlinks followed) to somewhere under ``root``; else UnsafePathError."""
    root, path = Path(root), Path(path)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"refusing to write {path}: it is outside {root}")
    return path


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
    def usefulness_work(self) -> Path:
        """The usefulness protocol's low-data sub-runs (a labeller and a generator per patient subset), cached."""
        return self.root / "usefulness"

    @property
    def label_baselines_cache(self) -> Path:
        """Otsu / Frangi / segmenter test scores by the key of their own inputs (tasks.shared.label_baselines), so a
        Pix2Pix retrained on the same data does not make them again."""
        return self.root / "cache" / "label_baselines"

    @property
    def usefulness_real_only_cache(self) -> Path:
        """The usefulness protocol's real-only arms and learning-curve points by the key of their own inputs
        (tasks.analyses.usefulness_protocol.RealOnlyStore): a generator retrained on the same data reuses them."""
        return self.root / "cache" / "usefulness_real_only"

    @property
    def step_records(self) -> Path:
        """One JSON record per finished step: its cache key, result and output stamps (tasks.engine)."""
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

    def timeline_figure(self, patient_id: str) -> Path:
        """figures/timelines/patient_<safe id>.png, checked to stay in the run directory."""
        return self.inside(self.figures / "timelines" / f"patient_{safe_component(patient_id)}.png")

    def inside(self, path: str | os.PathLike) -> Path:
        """``path`` when it stays under the run directory; else UnsafePathError (one line)."""
        return ensure_inside(self.root, path)


def read_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """RUN_DIR/report.json's content, validated by its schema (storage.report_schema.load_report: an invalid
    file is a one-line error); {} when the run has none. For typed access, call load_report itself."""
    path = RunPaths.of(run_dir).report_json
    return load_report(path).to_json() if path.exists() else {}
