"""Synthetic rows for a patient subset, made by the pipeline's own steps trained on that subset only.

The low-data arms of the usefulness protocol (tasks/usefulness.py) compare a few patients' real
rows with the same rows + synthetic rows of those patients' missing stages. For that comparison not
to leak, the labeller (Pix2Pix) and the generator (CRGAN) must be trained on the subset alone. This
module is the thin adapter that does it with the pipeline's step functions on a sub-run directory:

    REQUEST.work_dir/soul.h5   the subset's real rows (split 'train') + the validation patients
                               (split 'val'; the last one 'test', which the training preflight needs
                               and nothing reads); no other patient
    train Pix2Pix -> train CRGAN -> fill missing stages -> label -> score   (the run's config, seed)

and returns the subset patients' synthetic rows with their ``accepted`` flags. The step functions
are injected (:class:`PipelineSteps`), so a test can check what they are handed and a refactor of
the steps changes only :func:`pipeline_steps`.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from storage.atomic import atomic_path
from storage.hashing import json_sha256
from storage.paired_format import PairedDatasetWriter, read_arrays, read_meta
from storage.run_dir import RunPaths
from storage.work_files import read_work_array, read_work_table
from tasks.config import PipelineConfig
from tasks.usefulness import Rows, SubsetRequest

StepFn = Callable[[Path, PipelineConfig], Path]
WorkFn = Callable[[Path, PipelineConfig, Path], object]
ScoreFn = Callable[[Path, PipelineConfig, Path, Path], object]


@dataclass(frozen=True)
class PipelineSteps:
    """The five steps a subset needs, each on a run directory (the signatures of tasks/*.py today)."""

    train_labeller: StepFn   # -> the Pix2Pix checkpoint to label with
    train_generator: StepFn  # -> the CRGAN checkpoint to fill and score with
    fill: WorkFn             # (run_dir, config, crgan checkpoint): RUN/work/synthetic.h5
    label: WorkFn            # (run_dir, config, pix2pix checkpoint): RUN/work/labels.h5
    score: ScoreFn           # (run_dir, config, crgan checkpoint, pix2pix checkpoint): RUN/work/scores.csv


def _quiet(_: str) -> None:
    pass


def pipeline_steps() -> PipelineSteps:
    """The product's step functions (imported here only: the one place that knows their signatures)."""
    from tasks.fill_stages import fill_missing
    from tasks.label import label_synthetic
    from tasks.score import score_samples
    from tasks.train_crgan import train_crgan
    from tasks.train_pix2pix import train_pix2pix

    return PipelineSteps(
        train_labeller=lambda run, cfg: Path(train_pix2pix(run, cfg, log=_quiet).best_path),
        train_generator=lambda run, cfg: Path(train_crgan(run, cfg, log=_quiet).best_path),
        fill=lambda run, cfg, ckpt: fill_missing(run, cfg, ckpt, log=_quiet),
        label=lambda run, cfg, ckpt: label_synthetic(run, cfg, ckpt, log=_quiet),
        score=lambda run, cfg, crgan, pix2pix: score_samples(run, cfg, crgan, pix2pix, log=_quiet),
    )


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


def read_subset_synthetic(run_dir: Path, patients: tuple[str, ...]) -> Rows:
    """The sub-run's synthetic rows (work files of fill, label and score) of ``patients``."""
    paths = RunPaths.of(run_dir)
    table = read_work_table(paths.synthetic_h5)
    if table.empty:
        size = read_arrays(RunPaths.of(run_dir).soul_h5, [0])[0].shape[-1]
        empty = np.zeros((0, size, size), np.uint8)
        return Rows(empty, empty, np.zeros(0, str), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
    images = read_work_array(paths.synthetic_h5, "images")
    labels = read_work_array(paths.synthetic_labels_h5, "labels")
    scores = pd.read_csv(paths.scores_csv, dtype={"patient_id": str})
    if len(scores) != len(table) or not (scores["patient_id"].to_numpy() == table["patient_id"].to_numpy()).all():
        raise ValueError(f"{paths.scores_csv}: rows do not match {paths.synthetic_h5}")
    mine = np.isin(table["patient_id"].astype(str).to_numpy(), list(patients))
    return Rows(images[mine].astype(np.uint8), labels[mine].astype(np.uint8),
                table["patient_id"].astype(str).to_numpy()[mine], table["stage"].to_numpy(np.int64)[mine],
                np.ones(int(mine.sum()), bool), scores["accepted"].to_numpy(bool)[mine])


CACHE_NAME = "synthetic_rows.npz"


def subset_cache_key(request: SubsetRequest, config: PipelineConfig) -> str:
    """What a subset's synthetic rows depend on: the request, every config field but the usefulness
    protocol's own (a new mix weight or filter reuses the subset's models), and the code of the steps
    that make them (tasks.steps.code_fingerprint: an edited scoring rule does not serve old rows)."""
    from tasks.steps import code_fingerprint

    fields = {k: v for k, v in json.loads(config.to_json()).items() if k != "usefulness"}
    return json_sha256({"request": request.key(), "config": fields, "code": code_fingerprint(pipeline_steps)})


class PipelineSubsetMaker:
    """A :class:`tasks.usefulness.SyntheticMaker` that runs the pipeline's steps on a sub-run.

    The rows are cached in ``work_dir/synthetic_rows.npz`` under a key of the request and the
    config, so a rerun of the study (another filter or weight) does not retrain the models.
    """

    def __init__(self, config: PipelineConfig, steps: PipelineSteps | None = None) -> None:
        self.config = config
        self.steps = steps

    def __call__(self, request: SubsetRequest) -> Rows:
        run = Path(request.work_dir)
        cfg = self.config.with_overrides(seed=request.seed)
        key = subset_cache_key(request, cfg)
        cache = run / CACHE_NAME
        if cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return Rows(z["images"], z["labels"], z["patient_id"], z["stage"],
                                np.ones(len(z["stage"]), bool), z["accepted"])
        if run.exists():  # made for another request or config: nothing in it may be resumed
            shutil.rmtree(run)
        steps = self.steps or pipeline_steps()
        write_subset_soul(request, RunPaths.of(run).soul_h5)
        labeller = steps.train_labeller(run, cfg)
        generator = steps.train_generator(run, cfg)
        steps.fill(run, cfg, generator)
        steps.label(run, cfg, labeller)
        steps.score(run, cfg, generator, labeller)
        rows = read_subset_synthetic(run, request.train_patients)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, key=key, images=rows.images, labels=rows.labels, patient_id=rows.patient_id.astype(str),
                         stage=rows.stage, accepted=rows.accepted)
        return rows
