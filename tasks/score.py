"""The 'score' step: four scores per synthetic sample, and its acceptance by thresholds calibrated on
held-out real rows (or fixed).

The scores (consistency_ssim, realism, density_z, label_confidence), where the thresholds come from,
and why a degenerate label is never accepted: docs/steps.md and docs/design.md section 7.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from brvo_models.batched_metrics import metrics_device, paired_scores
from brvo_models.metrics import ssim
from brvo_models.runtime import select_device
from storage.atomic import atomic_path
from storage.paired_format import read_arrays, read_meta
from storage.run_dir import RunPaths
from storage.work_files import read_work_array, read_work_table
from tasks.config import PipelineConfig
from tasks.engine.logs import run_log
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.fill import FillResult
    from tasks.label import LabelResult
    from tasks.shared.trained_model import TrainedModel
    from tasks.preprocess import PreprocessResult

SCORE_NAMES = ("consistency_ssim", "realism", "density_z", "label_confidence")
#: a synthetic label's vessel fraction: not a score of augmented.h5's meta, but scores.csv and the report carry it
LABEL_DENSITY = "label_density"
#: why a label is degenerate (scores.csv's `rejection` column and report.json's `degenerate_by` use these words)
EMPTY_LABEL = "empty label"
ALL_VESSEL_LABEL = "all-vessel label"
BELOW_ANNOTATIONS = "density below the training annotations' range"
ABOVE_ANNOTATIONS = "density above the training annotations' range"
#: the scores whose bounds 'calibrated' acceptance takes from held-out real rows (realism: see the module doc)
CALIBRATED_SCORES = ("consistency_ssim", "density_z", "label_confidence")
#: fewer real rows than this cannot place a 5 % quantile: the thresholds fall back to the config's
MIN_CALIBRATION_ROWS = 20


class AcceptanceThresholds(BaseModel):
    """Where each score must lie for a synthetic sample to be accepted, and where the bounds came from."""

    min_consistency_ssim: float
    min_realism: float
    max_abs_density_z: float
    min_label_confidence: float
    source: Literal["config", "calibrated"]
    #: calibrated: the real rows used (split, rows, patients), the quantile, the share of those real rows
    #: that all four bounds accept, their score summaries; a fallback: why
    calibration: dict[str, Any] = {}
    #: the training annotations' vessel-density range (:func:`annotation_density_range`); None in reports
    #: written before it existed. Empty and all-vessel labels are rejected with or without it.
    min_label_density: float | None = None
    max_label_density: float | None = None
    label_density_source: str = ""

    @classmethod
    def from_config(cls, config: PipelineConfig, **calibration: Any) -> "AcceptanceThresholds":
        return cls(min_consistency_ssim=config.min_consistency_ssim, min_realism=config.min_realism,
                   max_abs_density_z=config.max_abs_density_z, min_label_confidence=config.min_label_confidence,
                   source="config", calibration=calibration)

    def rules(self) -> dict[str, str]:
        """Score -> the condition a sample must meet (what `accepted` means), as report.md prints it."""
        return {"consistency_ssim": f">= {self.min_consistency_ssim:.4g}", "realism": f">= {self.min_realism:.4g}",
                "density_z": f"|z| <= {self.max_abs_density_z:.4g}",
                "label_confidence": f">= {self.min_label_confidence:.4g}",
                LABEL_DENSITY: self.label_density_rule()}

    def label_density_rule(self) -> str:
        """Short, for a table cell: the range excludes 0 and 1 (empty and all-vessel labels) by construction."""
        if self.min_label_density is None or self.max_label_density is None:
            return "in (0, 1)"
        return f"in [{self.min_label_density:.4g}, {self.max_label_density:.4g}]"


class ScoreResult(BaseModel):
    scores_csv: str
    n: int
    n_accepted: int
    per_stage_accepted: dict[int, int]
    summary: dict[str, dict[str, float]]
    thresholds: AcceptanceThresholds
    seconds: float


def nearest_observed_stage(observed: list[int], stage: int) -> int:
    """The observed stage closest in time to ``stage``; ties go to the earlier one."""
    if not observed:
        raise ValueError("patient has no observed stage")
    return min(observed, key=lambda s: (abs(s - stage), s))


def density_z_scores(densities: np.ndarray, patient_means: np.ndarray, population_std: float) -> np.ndarray:
    """(density - patient's mean real density) / spread of real densities across the population."""
    return (np.asarray(densities, np.float64) - np.asarray(patient_means, np.float64)) / max(population_std, 1e-6)


def readable_annotations(meta: pd.DataFrame, labelled_train_patients: tuple[str, ...] | None) -> np.ndarray:
    """Bool per real row: may a step read its annotation? Every row, unless the run names its labelled train
    patients (a label-scarce clinic): then the other train patients' annotations do not exist for the run,
    though their images do (validation and test rows keep theirs: selection and evaluation need them)."""
    if labelled_train_patients is None:
        return np.ones(len(meta), bool)
    train = meta["split"].to_numpy() == "train"
    return ~train | meta["patient_id"].isin(set(labelled_train_patients)).to_numpy()


def annotation_statistics(meta: pd.DataFrame, densities: np.ndarray, readable: np.ndarray
                          ) -> tuple[pd.Series, float, dict[str, Any]]:
    """From the annotations a step may read (``readable``): each patient's mean vessel density (a patient
    with none readable gets the readable rows' mean, so density_z compares them with the population),
    the population's spread, and the label floor (:func:`label_floor_fields`)."""
    densities = np.asarray(densities, np.float64)
    readable = np.asarray(readable, bool)
    known = pd.Series(densities[readable]).groupby(meta["patient_id"].to_numpy()[readable]).mean()
    fallback = float(densities[readable].mean()) if readable.any() else 0.0
    patients = pd.unique(meta["patient_id"].to_numpy())
    patient_density = known.reindex(patients).fillna(fallback)
    population_std = float(densities[readable].std()) if readable.any() else 0.0
    return patient_density, population_std, label_floor_fields(meta[readable], densities[readable])


def annotation_density_range(meta: pd.DataFrame, densities: np.ndarray) -> tuple[float, float, str]:
    """(min, max, where from) of the vessel densities of the train patients' annotations in soul.h5.

    Why these: they are the only labels in the run that no model under test made and that no
    evaluation holds out. The calibrated bounds come from Pix2Pix's own labels of real rows, so a
    Pix2Pix that labels everything vessel calibrates a density_z bound wide enough for its own labels.
    Why min..max rather than a quantile band: every one of these annotations is a plausible label by
    definition, and on a small run the extreme quantiles are the extremes anyway; this floor exists to
    stop failures, the calibrated bounds do the fine selection. Annotations that are themselves empty or
    all vessel are left out (they are degenerate, not a range to copy). Without train rows, all real rows.
    """
    densities = np.asarray(densities, np.float64)
    train = meta["split"].to_numpy() == "train"
    rows, which = (train, "train") if train.any() else (np.ones(len(meta), bool), "real (no train split)")
    rows = rows & (densities > 0.0) & (densities < 1.0)
    if not rows.any():
        return 0.0, 1.0, f"no usable {which} annotation: only empty and all-vessel labels are rejected"
    patients = meta.loc[rows, "patient_id"].nunique()
    return (float(densities[rows].min()), float(densities[rows].max()),
            f"{int(rows.sum())} {which} annotations of {patients} patients (min..max)")


def label_density_failures(densities: np.ndarray, thresholds: AcceptanceThresholds) -> np.ndarray:
    """Per label, why it is degenerate ('' when it is not): empty, all vessel, or outside the training
    annotations' density range (when ``thresholds`` carries one)."""
    d = np.asarray(densities, np.float64)
    out = np.full(d.shape, "", dtype=object)
    if thresholds.min_label_density is not None:
        out[d < thresholds.min_label_density] = BELOW_ANNOTATIONS
    if thresholds.max_label_density is not None:
        out[d > thresholds.max_label_density] = ABOVE_ANNOTATIONS
    out[d <= 0.0] = EMPTY_LABEL
    out[d >= 1.0] = ALL_VESSEL_LABEL
    return out


def threshold_passes(scores: pd.DataFrame, thresholds: AcceptanceThresholds) -> dict[str, np.ndarray]:
    """Per score, True where the sample is inside that score's threshold; ``label_density`` (every scores.csv
    has it) must not be degenerate (:func:`label_density_failures`)."""
    passes = {
        "consistency_ssim": scores["consistency_ssim"].to_numpy() >= thresholds.min_consistency_ssim,
        "realism": scores["realism"].to_numpy() >= thresholds.min_realism,
        "density_z": np.abs(scores["density_z"].to_numpy()) <= thresholds.max_abs_density_z,
        "label_confidence": scores["label_confidence"].to_numpy() >= thresholds.min_label_confidence,
    }
    if LABEL_DENSITY in scores:
        passes[LABEL_DENSITY] = label_density_failures(scores[LABEL_DENSITY].to_numpy(), thresholds) == ""
    return passes


def accept_mask(scores: pd.DataFrame, thresholds: AcceptanceThresholds) -> np.ndarray:
    """True where every score is inside its threshold."""
    return np.logical_and.reduce(list(threshold_passes(scores, thresholds).values()))


def rejection_reasons(scores: pd.DataFrame, thresholds: AcceptanceThresholds) -> list[str]:
    """Per sample, the rules it fails ('' when accepted), e.g. 'label_density (all-vessel label); density_z'."""
    failed = {name: ~ok for name, ok in threshold_passes(scores, thresholds).items()}
    why = (label_density_failures(scores[LABEL_DENSITY].to_numpy(), thresholds) if LABEL_DENSITY in scores
           else np.full(len(scores), "", dtype=object))
    return ["; ".join(f"{name} ({why[i]})" if name == LABEL_DENSITY else name
                      for name, mask in failed.items() if mask[i]) for i in range(len(scores))]


def calibrate_thresholds(real_scores: pd.DataFrame, config: PipelineConfig, *,
                         label_floor: dict[str, Any] | None = None, **provenance: Any) -> AcceptanceThresholds:
    """Bounds from the four scores of held-out real rows: each calibrated score's bound is the real rows'
    ``config.acceptance_quantile`` (consistency, label confidence) or ``1 - quantile`` of |density_z|;
    realism keeps ``config.min_realism`` (see the module docstring). ``label_floor``: the training annotations'
    density range (:func:`label_floor_fields`). ``provenance`` (which rows) is kept."""
    q = float(config.acceptance_quantile)
    thresholds = AcceptanceThresholds(
        min_consistency_ssim=float(np.quantile(real_scores["consistency_ssim"], q)),
        min_realism=config.min_realism,
        max_abs_density_z=float(np.quantile(np.abs(real_scores["density_z"]), 1.0 - q)),
        min_label_confidence=float(np.quantile(real_scores["label_confidence"], q)),
        source="calibrated", calibration={}, **(label_floor or {}))
    thresholds.calibration = {
        **provenance, "rows": int(len(real_scores)), "quantile": q, "calibrated_scores": list(CALIBRATED_SCORES),
        "real_pass_rate": round(float(accept_mask(real_scores, thresholds).mean()), 4),
        "real_scores": summarise(real_scores)}
    return thresholds


def label_floor_fields(meta: pd.DataFrame, densities: np.ndarray) -> dict[str, Any]:
    """The :class:`AcceptanceThresholds` fields of the training annotations' density range."""
    low, high, source = annotation_density_range(meta, densities)
    return {"min_label_density": low, "max_label_density": high, "label_density_source": source}


def summarise(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """mean, p10 and p90 of every score (and of label_density where the frame has it), NaN left out."""
    out = {}
    for name in SCORE_NAMES + ((LABEL_DENSITY,) if LABEL_DENSITY in scores else ()):
        v = scores[name].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        out[name] = ({"mean": float(v.mean()), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}
                     if v.size else {"mean": float("nan"), "p10": float("nan"), "p90": float("nan")})
    return out


def score_samples(run_dir: Path, config: PipelineConfig, crgan_checkpoint: Path, pix2pix_checkpoint: Path, *,
                  log=run_log, score_on="auto", soul_h5: str | Path | None = None,
                  synthetic_h5: str | Path | None = None, labels_h5: str | Path | None = None) -> ScoreResult:
    """Score the synthetic rows (``synthetic_h5``, ``labels_h5``) against the real ones (``soul_h5``; each
    default RUN_DIR's) -> RUN_DIR's scores.csv. ``score_on``: where consistency SSIMs are computed
    (brvo_models.batched_metrics.metrics_device: "auto" = the GPU when the run's device is CUDA, else numpy)."""
    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    soul = Path(soul_h5) if soul_h5 is not None else paths.soul_h5
    synthetic = Path(synthetic_h5) if synthetic_h5 is not None else paths.synthetic_h5
    labelled = Path(labels_h5) if labels_h5 is not None else paths.synthetic_labels_h5
    table = read_work_table(synthetic)
    images = read_work_array(synthetic, "images")
    labels = read_work_array(labelled, "labels")
    confidence = read_work_array(labelled, "label_confidence")

    real_meta = read_meta(soul)
    real_images, real_labels = read_arrays(soul)
    real_density = real_labels.reshape(len(real_labels), -1).mean(axis=1)
    patient_density, population_std, label_floor = annotation_statistics(
        real_meta, real_density, readable_annotations(real_meta, config.labelled_train_patients))

    stage_means: dict[tuple[str, int], np.ndarray] = {}
    for (pid, stage), rows in real_meta.groupby(["patient_id", "stage"]).groups.items():
        stage_means[(pid, int(stage))] = real_images[np.asarray(rows)].astype(np.float32).mean(axis=0) / 255.0
    observed = real_meta.groupby("patient_id")["stage"].apply(lambda s: sorted(set(int(x) for x in s))).to_dict()

    refs = [(pid, nearest_observed_stage(observed[pid], int(stage))) for pid, stage in zip(table["patient_id"],
                                                                                           table["stage"])]
    scores_device = metrics_device(select_device(config.device), score_on)

    from brvo_models.crgan import load_discriminator
    from brvo_models.crgan_sampling import realism

    discriminator, patient_index, device = load_discriminator(crgan_checkpoint, config.device, config.image_size)

    def four_scores(imgs: np.ndarray, pids: np.ndarray, stages: np.ndarray, refs: list[tuple[str, int]],
                    densities: np.ndarray, confidence: np.ndarray) -> pd.DataFrame:
        """The four scores of these images (synthetic or real, scored alike)."""
        return pd.DataFrame({
            "patient_id": pids, "stage": stages,
            "consistency_ssim": consistency_ssims(imgs, refs, stage_means, scores_device),
            "realism": np.asarray(realism(discriminator, imgs, np.asarray(stages, np.int64),
                                          [patient_index.get(pid) for pid in pids], device=device), np.float32),
            "density_z": density_z_scores(densities, patient_density.loc[pids].to_numpy(),
                                          population_std).astype(np.float32),
            "label_confidence": np.asarray(confidence, np.float32),
            LABEL_DENSITY: np.asarray(densities, np.float32)})

    scores = four_scores(images, table["patient_id"].to_numpy(), table["stage"].to_numpy(), refs,
                         labels.reshape(len(labels), -1).mean(axis=1), confidence)
    scores.insert(2, "sample_index", table["sample_index"].to_numpy())
    if config.acceptance == "fixed":
        thresholds = AcceptanceThresholds.from_config(config).model_copy(update=label_floor)
    else:
        thresholds = calibrated_on_real_rows(real_meta, real_images, observed, config, pix2pix_checkpoint,
                                             four_scores, log=log, label_floor=label_floor)
    scores["accepted"] = accept_mask(scores, thresholds)
    scores["rejection"] = rejection_reasons(scores, thresholds)
    degenerate = pd.Series(label_density_failures(scores[LABEL_DENSITY].to_numpy(), thresholds))
    degenerate = degenerate[degenerate != ""].value_counts()
    out = paths.scores_csv
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, index=False)
    n_acc = int(scores["accepted"].sum())
    per_stage = {int(s): int(v) for s, v in scores.groupby("stage")["accepted"].sum().items()}
    log(f"score: {n_acc}/{len(scores)} synthetic samples accepted ({thresholds.source} thresholds: "
        + "; ".join(f"{k} {v}" for k, v in thresholds.rules().items())
        + (f"; {thresholds.calibration['real_pass_rate']:.0%} of {thresholds.calibration['rows']} held-out real rows "
           "pass them" if thresholds.source == "calibrated" else "") + ")"
        + (f"; {int(degenerate.sum())} degenerate labels rejected ("
           + ", ".join(f"{n} {why}" for why, n in degenerate.items()) + ")" if len(degenerate) else ""))
    return ScoreResult(scores_csv=str(out), n=len(scores), n_accepted=n_acc, per_stage_accepted=per_stage,
                       summary=summarise(scores), thresholds=thresholds, seconds=time.perf_counter() - t0)


def consistency_ssims(images: np.ndarray, refs: list[tuple[str, int]], stage_means: dict[tuple[str, int], np.ndarray],
                      scores_device) -> np.ndarray:
    """SSIM of each image to the mean image of its reference (patient, stage): numpy, or batched on a device."""
    if scores_device is None:
        out = np.empty(len(refs), np.float32)
        for i, ref in enumerate(refs):
            out[i] = ssim(images[i].astype(np.float32) / 255.0, stage_means[ref])
        return out
    keys = sorted(set(refs))
    pool = np.stack([stage_means[k] for k in keys]) if keys else np.zeros((0,) + images.shape[1:], np.float32)
    slot = {k: i for i, k in enumerate(keys)}
    return paired_scores(images, pool, np.arange(len(refs)), [slot[r] for r in refs], ("ssim",),
                         device=scores_device)["ssim"].astype(np.float32)


def calibration_rows(real_meta: pd.DataFrame, observed: dict[str, list[int]]) -> tuple[np.ndarray, str]:
    """Real rows to calibrate on, and which: the validation patients' rows of patients seen at two or more
    stages (a row needs another real stage to be compared with); the train patients' added when that gives
    fewer than MIN_CALIBRATION_ROWS (their realism is then optimistic: the discriminator trained on them)."""
    several = real_meta["patient_id"].map(lambda pid: len(observed[pid]) > 1).to_numpy()
    for splits in (("val",), ("val", "train")):
        rows = np.flatnonzero(real_meta["split"].isin(splits).to_numpy() & several)
        if len(rows) >= MIN_CALIBRATION_ROWS:
            return rows, "+".join(splits)
    return rows, "+".join(splits)


def calibrated_on_real_rows(real_meta: pd.DataFrame, real_images: np.ndarray, observed: dict[str, list[int]],
                            config: PipelineConfig, pix2pix_checkpoint: Path,
                            four_scores: Callable[..., pd.DataFrame], *, log=run_log,
                            label_floor: dict[str, Any] | None = None) -> AcceptanceThresholds:
    """Score held-out real rows as synthetic ones are scored (``four_scores``), and take the bounds from them.
    ``label_floor`` (the training annotations' density range) is kept whichever way the bounds are set."""
    from brvo_models.pix2pix import label_images, load_labeller
    from tasks.label import label_confidence

    rows, splits = calibration_rows(real_meta, observed)
    if len(rows) < MIN_CALIBRATION_ROWS:
        reason = (f"only {len(rows)} real rows of patients seen at two or more stages in the val and train splits "
                  f"(calibration needs {MIN_CALIBRATION_ROWS}); the configured constants were used")
        log(f"score: acceptance thresholds not calibrated: {reason}", logging.WARNING)
        return AcceptanceThresholds.from_config(config, fallback_reason=reason).model_copy(update=label_floor or {})
    meta = real_meta.iloc[rows]
    pids, stages = meta["patient_id"].to_numpy(), meta["stage"].to_numpy()
    refs = [(pid, nearest_observed_stage([s for s in observed[pid] if s != int(stage)], int(stage)))
            for pid, stage in zip(pids, stages)]
    generator, device = load_labeller(pix2pix_checkpoint, config.device, config.image_size)
    probabilities, masks = label_images(generator, real_images[rows], threshold=config.pix2pix.threshold,
                                        device=device)
    real_scores = four_scores(real_images[rows], pids, stages, refs, masks.reshape(len(masks), -1).mean(axis=1),
                              label_confidence(probabilities))
    return calibrate_thresholds(real_scores, config, label_floor=label_floor, split=splits,
                                patients=int(meta["patient_id"].nunique()))


def score_step(ctx: StepContext, preprocess: PreprocessResult, fill: FillResult, label: LabelResult,
               crgan: TrainedModel, pix2pix: TrainedModel) -> ScoreResult:
    """The 'score' step: four scores per synthetic sample, the thresholds, and the accepted flag."""
    return score_samples(ctx.run_dir, ctx.config, crgan.checkpoint_path, pix2pix.checkpoint_path, log=ctx.log,
                         soul_h5=preprocess.path, synthetic_h5=fill.synthetic_h5, labels_h5=label.labels_h5)


SCORE = Step(
    name="score", run=score_step, result_type=ScoreResult, needs=("preprocess", "fill", "label", "crgan", "pix2pix"),
    reads=("soul_h5", "synthetic_h5", "synthetic_labels_h5"), writes=("scores_csv",), config_fields=("labelled_train_patients", "acceptance", "acceptance_quantile", "min_consistency_ssim", "min_realism",
                                           "max_abs_density_z", "min_label_confidence", "pix2pix.threshold",
                                           "image_size", "device"),
    description="score every synthetic sample; accept or reject it by thresholds calibrated on held-out real rows")
