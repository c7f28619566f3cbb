"""Synthetic rows for a patient subset, made by the pipeline's own steps trained on that subset only.

The low-data arms of the usefulness protocol (tasks.analyses.usefulness_protocol) compare a few
patients' real rows with the same rows + synthetic rows of those patients' missing stages. For that
comparison not to leak, the labeller (Pix2Pix) and the generator (CRGAN) must be trained on the
subset alone. This module runs the pipeline's steps on a sub-run directory with the step engine's
driver (:func:`tasks.engine.run_plan`), under the same cache rules as any run:

    REQUEST.work_dir/request/subset.json   the request (patients, seed, soul.h5's sha256): the sub-run's source
    preprocess (subset)  -> soul.h5         the subset's real rows (split 'train') + the validation patients
                                            (split 'val'; the last one 'test', which the training preflight
                                            needs and nothing reads); no other patient
    pix2pix -> crgan -> fill -> label -> score   the pipeline's steps, with the run's config and the request's seed

and returns the subset patients' synthetic rows with their ``accepted`` flags, read from the fill,
label and score results.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from storage.atomic import write_json_atomic
from storage.hashing import file_sha256
from storage.paired_format import DEFAULT_COMPRESSION, PairedDatasetWriter, read_arrays, read_meta
from storage.work_files import read_work_array, read_work_table
from tasks.analyses.usefulness_protocol import Rows, SubsetRequest
from tasks.config import PipelineConfig
from tasks.crgan import TRAIN_CRGAN
from tasks.engine import PlanRun, Step, StepContext, execute_plainly, run_plan
from tasks.fill import FILL
from tasks.label import LABEL
from tasks.pix2pix import TRAIN_PIX2PIX
from tasks.preprocess import PreprocessResult
from tasks.score import SCORE

REQUEST_DIR = "request"
REQUEST_FILE = "subset.json"


def write_subset_soul(request: SubsetRequest, out: Path) -> Path:
    """The sub-run's soul.h5: the subset as 'train', the selection patients as 'val' (the last 'test')."""
    meta = read_meta(request.soul_h5)
    real = ~meta["is_synthetic"].to_numpy(bool)
    pid = meta["patient_id"].astype(str).to_numpy()
    overlap = set(request.train_patients) & set(request.selection_patients)
    if overlap:
        raise ValueError(f"subset and selection patients overlap: {sorted(overlap)[:5]}")
    select = sorted(request.selection_patients)
    split_of = {p: "train" for p in request.train_patients}
    split_of.update({p: "val" for p in select[:-1]})
    if select:
        split_of[select[-1]] = "test" if len(select) > 1 else "val"
    keep = np.flatnonzero(real & np.isin(pid, list(split_of)))
    missing = set(request.train_patients) - set(pid[keep])
    if missing:
        raise ValueError(f"{request.soul_h5}: no real rows for subset patients {sorted(missing)[:5]}")
    images, labels = read_arrays(request.soul_h5, keep)
    rows = meta.iloc[keep].reset_index(drop=True)
    rows["split"] = [split_of[p] for p in rows["patient_id"].astype(str)]
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["patient_id", "stage", "exam_id", "subset", "split", "is_synthetic", "label_source"]
    with PairedDatasetWriter(out, images.shape[-1], attrs={"description": "usefulness low-data subset"}) as w:
        w.append(images, labels, rows[columns])
    return out


def write_request(request: SubsetRequest) -> Path:
    """REQUEST.work_dir/request/subset.json, the sub-run's source: its content (the patients, the seed and the
    run's soul.h5 by sha256) is what the subset's soul.h5 is made from, so a new request recomputes it."""
    folder = Path(request.work_dir) / REQUEST_DIR
    blob = {"soul_h5": str(request.soul_h5), "soul_h5_sha256": file_sha256(request.soul_h5),
            "train_patients": list(request.train_patients), "selection_patients": list(request.selection_patients),
            "seed": request.seed}
    path = folder / REQUEST_FILE
    if not path.is_file() or json.loads(path.read_text()) != blob:  # rewritten only when it changes: mtime
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, blob)
    return folder


def subset_soul_step(ctx: StepContext) -> PreprocessResult:
    """The sub-run's 'preprocess': its source (the request) -> soul.h5 of the subset and selection patients."""
    t0 = time.perf_counter()
    blob = json.loads((Path(ctx.source) / REQUEST_FILE).read_text())
    request = SubsetRequest(soul_h5=Path(blob["soul_h5"]), train_patients=tuple(blob["train_patients"]),
                            selection_patients=tuple(blob["selection_patients"]), seed=int(blob["seed"]),
                            work_dir=ctx.run_dir)
    if file_sha256(request.soul_h5) != blob["soul_h5_sha256"]:
        raise RuntimeError(f"{request.soul_h5} changed since the subset was requested; rerun the usefulness step")
    out = write_subset_soul(request, ctx.paths.soul_h5)
    meta = read_meta(out)
    return PreprocessResult(
        path=str(out), sha256=file_sha256(out), n_rows=len(meta), n_patients=int(meta["patient_id"].nunique()),
        n_skipped_unlabelled=0, split_rows={k: int(v) for k, v in meta["split"].value_counts().items()},
        split_patients={k: int(v) for k, v in meta.groupby("split")["patient_id"].nunique().items()},
        image_size=int(read_arrays(out, [0])[0].shape[-1]), compression=DEFAULT_COMPRESSION,
        seconds=time.perf_counter() - t0, timings={})


SUBSET_SOUL = Step(
    name="preprocess", run=subset_soul_step, result_type=PreprocessResult, reads_source=True, writes=("soul_h5",),
    description="the subset's real rows and the selection patients -> the sub-run's soul.h5")

#: What a subset's synthetic rows are made by: the pipeline's own steps after a subset 'preprocess'.
SUBSET_PLAN: tuple[Step, ...] = (SUBSET_SOUL, TRAIN_PIX2PIX, TRAIN_CRGAN, FILL, LABEL, SCORE)


def read_subset_synthetic(run: PlanRun, patients: tuple[str, ...]) -> Rows:
    """The synthetic rows of ``patients`` a finished sub-run made: the fill, label and score results' files."""
    synthetic_h5 = Path(run.result("fill").synthetic_h5)
    table = read_work_table(synthetic_h5)
    if table.empty:
        size = read_arrays(Path(run.result("preprocess").path), [0])[0].shape[-1]
        empty = np.zeros((0, size, size), np.uint8)
        return Rows(empty, empty, np.zeros(0, str), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
    images = read_work_array(synthetic_h5, "images")
    labels = read_work_array(Path(run.result("label").labels_h5), "labels")
    scores_csv = Path(run.result("score").scores_csv)
    scores = pd.read_csv(scores_csv, dtype={"patient_id": str})
    if len(scores) != len(table) or not (scores["patient_id"].to_numpy() == table["patient_id"].to_numpy()).all():
        raise ValueError(f"{scores_csv}: rows do not match {synthetic_h5}")
    mine = np.isin(table["patient_id"].astype(str).to_numpy(), list(patients))
    return Rows(images[mine].astype(np.uint8), labels[mine].astype(np.uint8),
                table["patient_id"].astype(str).to_numpy()[mine], table["stage"].to_numpy(np.int64)[mine],
                np.ones(int(mine.sum()), bool), scores["accepted"].to_numpy(bool)[mine])


def _quiet(_: str) -> None:
    pass


class PipelineSubsetMaker:
    """A :class:`tasks.analyses.usefulness_protocol.SyntheticMaker` that runs ``plan`` (default
    :data:`SUBSET_PLAN`) on a sub-run in ``request.work_dir``, each step served from its record when nothing
    it depends on changed (a rerun of the study with another filter or weight retrains nothing)."""

    def __init__(self, config: PipelineConfig, plan: Sequence[Step] = SUBSET_PLAN) -> None:
        self.config = config
        self.plan = tuple(plan)
        self.last_run: PlanRun | None = None

    def __call__(self, request: SubsetRequest) -> Rows:
        source = write_request(request)
        ctx = StepContext(run_dir=Path(request.work_dir), config=self.config.with_overrides(seed=request.seed),
                          source=source, log=_quiet)
        self.last_run = run_plan(self.plan, ctx, execute=execute_plainly)
        return read_subset_synthetic(self.last_run, request.train_patients)
