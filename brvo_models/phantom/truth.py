"""The truth of the visits a phantom's patients missed: the scans no clinic can take afterwards.

Why: a filled stage is a guess at a scan that was never taken. The phantom knows each
patient's anatomy and course, so it can render that scan, several times over with
acquisition noise of its own (one "true scan" to compare with, the others for a repeat-scan
ceiling and an oracle), and it knows every (patient, stage)'s true non-perfused fraction.
:mod:`brvo_models.fill_truth` judges the fill against them.

The truth goes to a directory of its own, outside the SOUL tree, and its scans draw from
RNG streams the tree never uses (``default_rng([seed, patient, stage, TRUTH_STREAM + k])``;
the tree's scans use k < 8), so writing it changes no byte of the tree. No pipeline step
reads it: only the evaluation does. Layout::

    truth.json    format tag, the phantom config, n_repeats, which repeat is the true scan, the RNG rule
    stages.csv    every (patient, stage), observed or not: patient_id, stage, subset, observed, n_scans,
                  extent, true_area (PatientParams.area), non_perfused_fraction
    scans.csv     every truth scan: patient_id, stage, subset, repeat, image, label (paths relative to the dir)
    scans/<pid>/<subset>/image_00.jpg, label_00.jpg, ...   JPG as the tree writes them (label 0/255)

Scans are JPGs saved exactly as the tree's, so a reader resizes them the way preprocess
resizes the tree (tasks.preprocess.load_pair) and compares like with like.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel

from brvo_models.phantom.acquisition import acquire_exam
from brvo_models.phantom.anatomy import Anatomy, build_anatomy, non_perfused_fraction, render_stage
from brvo_models.phantom.config import PhantomConfig
from brvo_models.phantom.soul_writer import PatientMap, _move_into_place, _save_jpg
from brvo_models.phantom.visit_plan import plan_visits
from storage.errors import BrvoError
from storage.paired_format import STAGE_NAMES

#: First RNG stream of the truth's scans; the tree's scans use streams 0..7 (at most 8 per visit).
TRUTH_STREAM = 1000
#: Repeat scans per missed (patient, stage): the true scan and eight more (the oracle averages those).
DEFAULT_REPEATS = 9
#: Index of the repeat that stands for the scan the patient would have had.
TRUE_SCAN = 0
FORMAT = "brvo-phantom-truth"
TRUTH_ENTRIES = frozenset({"truth.json", "stages.csv", "scans.csv", "scans"})


class TruthSummary(BaseModel):
    truth_dir: Path
    n_missing_pairs: int
    n_repeats: int
    n_scans: int
    seconds: float


@dataclass(frozen=True)
class TruthJob:
    """One patient's share: render every stage the patient missed, ``n_repeats`` scans each."""
    config: PhantomConfig
    index: int
    root: str
    attended: tuple[bool, ...]
    n_repeats: int


def _scan(anat: Anatomy, stage_img: np.ndarray, stage_label: np.ndarray, config: PhantomConfig, index: int,
          stage: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, index, stage, stream])
    return acquire_exam(stage_img, stage_label, config.image_size, anat.pad, rng, config.noise)


def truth_scans(config: PhantomConfig, patient_index: int, stage: int, streams: Sequence[int],
                anat: Anatomy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scans of one (patient, stage) from the given RNG streams: (uint8 images, uint8 0/255 labels), (n, S, S).

    Stream k < 8 is the tree's k-th scan of that visit (before JPEG); the truth uses
    ``TRUTH_STREAM + k``. Any stage of any patient can be rendered, attended or not.
    """
    anat = anat or build_anatomy(config, patient_index)
    stage_img, stage_label = render_stage(anat, stage)
    scans = [_scan(anat, stage_img, stage_label, config, patient_index, stage, k) for k in streams]
    return np.stack([s[0] for s in scans]), np.stack([s[1] for s in scans])


def _scan_names(pid: str, stage: int, repeat: int) -> tuple[str, str]:
    folder = f"scans/{pid}/{STAGE_NAMES[stage]}"
    return f"{folder}/image_{repeat:02d}.jpg", f"{folder}/label_{repeat:02d}.jpg"


def write_patient_truth(job: TruthJob) -> list[dict]:
    """Write one patient's truth scans; return its stages.csv rows."""
    config = job.config
    anat = build_anatomy(config, job.index)
    pid = str(job.index + 1)
    root = Path(job.root)
    for stage in range(len(STAGE_NAMES)):
        if job.attended[stage]:
            continue
        images, labels = truth_scans(config, job.index, stage, [TRUTH_STREAM + k for k in range(job.n_repeats)], anat)
        for k in range(job.n_repeats):
            image_name, label_name = _scan_names(pid, stage, k)
            (root / image_name).parent.mkdir(parents=True, exist_ok=True)
            _save_jpg(images[k], root / image_name)
            _save_jpg(labels[k], root / label_name)
    p = anat.params
    return [{"patient_id": pid, "stage": s, "subset": STAGE_NAMES[s], "observed": bool(job.attended[s]),
             "extent": p.extent(s), "true_area": p.area(s), "non_perfused_fraction": non_perfused_fraction(anat, s)}
            for s in range(len(STAGE_NAMES))]


def check_truth_target(truth_dir: Path, overwrite: bool, soul_dir: Path | None = None) -> None:
    """Fail before any work if ``truth_dir`` may not be (re)placed: it must lie outside the SOUL tree (and the
    tree outside it), and be new, empty or, with overwrite, a phantom truth."""
    truth_dir = Path(truth_dir)
    if soul_dir is not None:
        t, s = truth_dir.resolve(), Path(soul_dir).resolve()
        if t == s or t.is_relative_to(s) or s.is_relative_to(t):
            raise BrvoError(f"the truth dir {truth_dir} must lie outside the SOUL tree {soul_dir} (and the tree "
                            "outside it): the pipeline reads the tree and must never see the truth")
    if not truth_dir.exists():
        return
    if not truth_dir.is_dir():
        raise BrvoError(f"{truth_dir} exists and is not a directory: choose another truth dir")
    entries = {p.name for p in truth_dir.iterdir()}
    if entries and not overwrite:
        raise BrvoError(f"{truth_dir} is not empty: choose a new truth dir or pass overwrite to replace a truth")
    if not entries <= TRUTH_ENTRIES:
        extra = sorted(entries - TRUTH_ENTRIES)[:3]
        raise BrvoError(f"{truth_dir} holds more than a phantom truth ({', '.join(extra)}): refusing to replace it")


def write_truth(truth_dir: Path, config: PhantomConfig, *, n_repeats: int = DEFAULT_REPEATS, overwrite: bool = False,
                soul_dir: Path | None = None, map_patients: PatientMap = map,
                log: Callable[[str], None] | None = None) -> TruthSummary:
    """Write the truth of the phantom ``config`` describes into ``truth_dir`` (module docstring), atomically.

    ``soul_dir``: where the tree goes, checked to lie apart from ``truth_dir``. The bytes
    depend on ``config`` and ``n_repeats`` only, not on ``map_patients``.
    """
    if n_repeats < 2:
        raise BrvoError(f"n_repeats must be at least 2 (a true scan and a repeat), got {n_repeats}")
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    truth_dir = Path(truth_dir)
    check_truth_target(truth_dir, overwrite, soul_dir)
    truth_dir.parent.mkdir(parents=True, exist_ok=True)
    plan = plan_visits(config)
    n_missing = int((~plan.attendance).sum())
    tmp = Path(tempfile.mkdtemp(prefix=f".{truth_dir.name}.tmp-", dir=truth_dir.parent))
    try:
        jobs = [TruthJob(config, p, str(tmp), tuple(bool(a) for a in plan.attendance[p]), n_repeats)
                for p in range(config.n_patients)]
        log(f"phantom truth: rendering {n_missing} missed (patient, stage) pairs x {n_repeats} scans")
        stages = pd.DataFrame([row for rows in map_patients(write_patient_truth, jobs) for row in rows])
        stages.insert(4, "n_scans", plan.exam_counts.reshape(-1).astype(int))
        scans = pd.DataFrame([
            {"patient_id": row.patient_id, "stage": row.stage, "subset": row.subset, "repeat": k,
             "image": _scan_names(row.patient_id, row.stage, k)[0], "label": _scan_names(row.patient_id, row.stage, k)[1]}
            for row in stages.itertuples() if not row.observed for k in range(n_repeats)],
            columns=["patient_id", "stage", "subset", "repeat", "image", "label"])
        stages.to_csv(tmp / "stages.csv", index=False, float_format="%.9g")
        scans.to_csv(tmp / "scans.csv", index=False)
        (tmp / "truth.json").write_text(json.dumps({
            "format": FORMAT, "version": 1, "config": config.model_dump(mode="json"), "n_repeats": n_repeats,
            "true_scan": TRUE_SCAN, "n_missing_pairs": n_missing,
            "rng": f"numpy default_rng([seed, patient_index, stage, {TRUTH_STREAM} + repeat]); the tree's scans use "
                   "repeat < 8 without the offset",
            "note": "ground truth of a phantom: for evaluation only, never an input of the pipeline"},
            indent=1, sort_keys=True) + "\n")
        _move_into_place(tmp, truth_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = TruthSummary(truth_dir=truth_dir, n_missing_pairs=n_missing, n_repeats=n_repeats,
                           n_scans=n_missing * n_repeats, seconds=round(time.perf_counter() - start, 2))
    log(f"phantom truth: wrote {summary.n_scans} scans of {n_missing} missed pairs in {summary.seconds:.1f} s "
        f"to {truth_dir}")
    return summary


@dataclass(frozen=True)
class Truth:
    """A truth dir, read: its config, the per-(patient, stage) table and the scan index."""
    root: Path
    config: PhantomConfig
    n_repeats: int
    true_scan: int
    stages: pd.DataFrame
    scans: pd.DataFrame

    def missing_pairs(self) -> list[tuple[str, int]]:
        """(patient_id, stage) of every pair with truth scans, patients in numeric order."""
        rows = self.stages[~self.stages["observed"]]
        return sorted(((str(p), int(s)) for p, s in zip(rows["patient_id"], rows["stage"])),
                      key=lambda x: (int(x[0]) if x[0].isdigit() else 1 << 30, x[0], x[1]))

    def scan_paths(self, patient_id: str, stage: int) -> list[tuple[Path, Path]]:
        """(image, label) paths of the pair's scans in repeat order; a one-line error where there are none."""
        rows = self.scans[(self.scans["patient_id"] == str(patient_id)) & (self.scans["stage"] == int(stage))]
        if rows.empty:
            raise BrvoError(f"{self.root}: no truth scans for patient {patient_id} at {STAGE_NAMES[int(stage)]} "
                            "(the phantom saw that visit; only missed visits have truth scans)")
        rows = rows.sort_values("repeat")
        return [(self.root / i, self.root / lab) for i, lab in zip(rows["image"], rows["label"])]

    def load(self, patient_id: str, stage: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair's scans at the phantom's size: uint8 images and 0/1 labels (n_repeats, S, S)."""
        pairs = self.scan_paths(patient_id, stage)
        images = np.stack([np.asarray(Image.open(i).convert("L")) for i, _ in pairs])
        labels = np.stack([(np.asarray(Image.open(lab).convert("L")) > 127).astype(np.uint8) for _, lab in pairs])
        return images, labels

    def true_area(self, patient_id: str, stage: int) -> float:
        row = self.stages[(self.stages["patient_id"] == str(patient_id)) & (self.stages["stage"] == int(stage))]
        if row.empty:
            raise BrvoError(f"{self.root}: patient {patient_id} is not in the phantom's truth")
        return float(row["true_area"].iloc[0])


def read_truth(truth_dir: Path) -> Truth:
    """Read a truth dir written by :func:`write_truth`; a one-line BrvoError when it is not one."""
    root = Path(truth_dir)
    try:
        meta = json.loads((root / "truth.json").read_text())
        stages = pd.read_csv(root / "stages.csv", dtype={"patient_id": str})
        scans = pd.read_csv(root / "scans.csv", dtype={"patient_id": str})
    except (OSError, ValueError) as exc:
        raise BrvoError(f"{root}: not a phantom truth dir (truth.json, stages.csv, scans.csv): {exc}") from None
    if meta.get("format") != FORMAT:
        raise BrvoError(f"{root}/truth.json: format {meta.get('format')!r}, expected {FORMAT!r}")
    stages["observed"] = stages["observed"].astype(bool)
    return Truth(root, PhantomConfig.model_validate(meta["config"]), int(meta["n_repeats"]), int(meta["true_scan"]),
                 stages, scans)
