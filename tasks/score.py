"""Score every synthetic sample, and accept or reject it by configurable thresholds.

Per sample (the metrics of docs/design.md, section 7):
- consistency_ssim: SSIM to the mean image of the patient's nearest real stage
  (ties go to the earlier stage): does it still look like this patient?
- realism: the CRGAN discriminator's probability that it is real, given (patient, stage);
- density_z: vessel density of its Pix2Pix label minus the patient's mean real label
  density, in units of the population's spread of real densities: plausible anatomy?
- label_confidence: mean per-pixel confidence of the Pix2Pix label (from the label step).

Rejected samples stay in the output with accepted = False, so users choose.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

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
from tasks.reporting import run_log
from tasks.steps import Step, StepContext

if TYPE_CHECKING:
    from tasks.fill_stages import FillResult
    from tasks.label import LabelResult
    from tasks.models import TrainedModel
    from tasks.preprocess import PreprocessResult

SCORE_NAMES = ("consistency_ssim", "realism", "density_z", "label_confidence")


class ScoreResult(BaseModel):
    scores_csv: str
    n: int
    n_accepted: int
    per_stage_accepted: dict[int, int]
    summary: dict[str, dict[str, float]]
    seconds: float


def nearest_observed_stage(observed: list[int], stage: int) -> int:
    """The observed stage closest in time to ``stage``; ties go to the earlier one."""
    if not observed:
        raise ValueError("patient has no observed stage")
    return min(observed, key=lambda s: (abs(s - stage), s))


def density_z_scores(densities: np.ndarray, patient_means: np.ndarray, population_std: float) -> np.ndarray:
    """(density - patient's mean real density) / spread of real densities across the population."""
    return (np.asarray(densities, np.float64) - np.asarray(patient_means, np.float64)) / max(population_std, 1e-6)


def threshold_passes(scores: pd.DataFrame, config: PipelineConfig) -> dict[str, np.ndarray]:
    """Per score, True where the sample is inside that score's configured threshold."""
    return {
        "consistency_ssim": scores["consistency_ssim"].to_numpy() >= config.min_consistency_ssim,
        "realism": scores["realism"].to_numpy() >= config.min_realism,
        "density_z": np.abs(scores["density_z"].to_numpy()) <= config.max_abs_density_z,
        "label_confidence": scores["label_confidence"].to_numpy() >= config.min_label_confidence,
    }


def accept_mask(scores: pd.DataFrame, config: PipelineConfig) -> np.ndarray:
    """True where every score is inside its configured threshold."""
    return np.logical_and.reduce(list(threshold_passes(scores, config).values()))


def summarise(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for name in SCORE_NAMES:
        v = scores[name].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        out[name] = ({"mean": float(v.mean()), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}
                     if v.size else {"mean": float("nan"), "p10": float("nan"), "p90": float("nan")})
    return out


def score_samples(run_dir: Path, config: PipelineConfig, crgan_checkpoint: Path, *, log=run_log,
                  score_on="auto") -> ScoreResult:
    """``score_on``: where consistency SSIMs are computed (brvo_models.batched_metrics.metrics_device:
    "auto" = the GPU when the run's device is CUDA, else numpy)."""
    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    table = read_work_table(paths.synthetic_h5)
    images = read_work_array(paths.synthetic_h5, "images")
    labels = read_work_array(paths.synthetic_labels_h5, "labels")
    confidence = read_work_array(paths.synthetic_labels_h5, "label_confidence")

    real_meta = read_meta(paths.soul_h5)
    real_images, real_labels = read_arrays(paths.soul_h5)
    real_density = real_labels.reshape(len(real_labels), -1).mean(axis=1)
    population_std = float(real_density.std())
    patient_density = pd.Series(real_density).groupby(real_meta["patient_id"].to_numpy()).mean()

    stage_means: dict[tuple[str, int], np.ndarray] = {}
    for (pid, stage), rows in real_meta.groupby(["patient_id", "stage"]).groups.items():
        stage_means[(pid, int(stage))] = real_images[np.asarray(rows)].astype(np.float32).mean(axis=0) / 255.0
    observed = real_meta.groupby("patient_id")["stage"].apply(lambda s: sorted(set(int(x) for x in s))).to_dict()

    refs = [(pid, nearest_observed_stage(observed[pid], int(stage))) for pid, stage in zip(table["patient_id"],
                                                                                           table["stage"])]
    scores_device = metrics_device(select_device(config.device), score_on)
    if scores_device is None:
        consistency = np.empty(len(table), np.float32)
        for i, ref in enumerate(refs):
            consistency[i] = ssim(images[i].astype(np.float32) / 255.0, stage_means[ref])
    else:
        keys = sorted(set(refs))
        pool = np.stack([stage_means[k] for k in keys]) if keys else np.zeros((0,) + images.shape[1:], np.float32)
        slot = {k: i for i, k in enumerate(keys)}
        consistency = paired_scores(images, pool, np.arange(len(refs)), [slot[r] for r in refs], ("ssim",),
                                    device=scores_device)["ssim"].astype(np.float32)

    from brvo_models.crgan import load_discriminator
    from brvo_models.crgan_sampling import realism

    discriminator, patient_index, device = load_discriminator(crgan_checkpoint, config.device, config.image_size)
    realism_p = realism(discriminator, images, table["stage"].to_numpy(dtype=np.int64),
                        [patient_index.get(pid) for pid in table["patient_id"]], device=device)

    densities = labels.reshape(len(labels), -1).mean(axis=1)
    scores = pd.DataFrame({
        "patient_id": table["patient_id"].to_numpy(),
        "stage": table["stage"].to_numpy(),
        "sample_index": table["sample_index"].to_numpy(),
        "consistency_ssim": consistency,
        "realism": np.asarray(realism_p, np.float32),
        "density_z": density_z_scores(densities, patient_density.loc[table["patient_id"]].to_numpy(),
                                      population_std).astype(np.float32),
        "label_confidence": np.asarray(confidence, np.float32),
    })
    scores["accepted"] = accept_mask(scores, config)
    out = paths.scores_csv
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, index=False)
    n_acc = int(scores["accepted"].sum())
    per_stage = {int(s): int(v) for s, v in scores.groupby("stage")["accepted"].sum().items()}
    log(f"score: {n_acc}/{len(scores)} synthetic samples accepted")
    return ScoreResult(scores_csv=str(out), n=len(scores), n_accepted=n_acc, per_stage_accepted=per_stage,
                       summary=summarise(scores), seconds=time.perf_counter() - t0)


def score_step(ctx: StepContext, preprocess: PreprocessResult, fill: FillResult, label: LabelResult,
               crgan: TrainedModel) -> ScoreResult:
    """The 'score' step: four scores per synthetic sample and the accepted flag."""
    return score_samples(ctx.run_dir, ctx.config, crgan.checkpoint_path, log=ctx.log)


SCORE = Step(
    name="score", run=score_step, result_type=ScoreResult, needs=("preprocess", "fill", "label", "crgan"),
    writes=("scores_csv",), config_fields=("min_consistency_ssim", "min_realism", "max_abs_density_z",
                                           "min_label_confidence", "image_size", "device"),
    description="score every synthetic sample; accept or reject it by the configured thresholds")
