"""The 'pix2pix' step: train Pix2Pix (image -> vessel label) on soul.h5 and evaluate it on held-out patients
against Otsu, Frangi and a supervised segmenter (report.json['pix2pix']).

The splits are read once into memory and batched with seeded augmentation, so a resumed CPU run is
exact. Details: docs/steps.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from brvo_models import batched_metrics
from brvo_models.metrics import choose_threshold, cosine, label_scores, mean_scores, mse, ssim
from brvo_models.identity import CheckpointIdentity
from brvo_models.pix2pix import (Pix2Pix, aligned_augment, label_images, load_labeller, num_downs_for,
                                 objective_text)
from brvo_models.runtime import seed_everything, select_device, to_model_range
from brvo_models.training import BEST, LAST, Schedule, fit, steps_per_epoch
from storage.checkpoints import checkpoint_sha256, load_checkpoint
from storage.errors import BrvoError
from storage.paired_format import read_arrays, read_meta
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.shared.trained_model import TrainedModel, train_and_evaluate
from tasks.shared.preflight import require_soul_h5
from tasks.engine.logs import LogFn, run_log
from tasks.engine import Step, StepCommand, StepContext
from tasks.shared.label_baselines import label_baselines

if TYPE_CHECKING:
    from tasks.preprocess import PreprocessResult

MODEL = "pix2pix"
PAPER_CONTEXT = {
    "dataset": "real SOUL (Xue et al., Sci Data 2024), NOT this run's data",
    "dice": {"U-Net (pre-trained on ROSE-1)": 0.72, "OCTA-Net (pre-trained on ROSE-1)": 0.77},
    "note": "context only: a different dataset and label source; not comparable with these numbers",
}
METRIC_NOTES = (
    "Per test image, then averaged. dice/iou/cldice compare each method's binary mask with the "
    "annotated label. mse/ssim/cosine also compare the binary mask (as a 0/1 image) with the label, "
    "so the three methods are scored on the same footing (Otsu has no probability map); "
    "ssim: skimage, Gaussian weights, sigma 1.5, data_range 1."
)


class Pix2PixResult(BaseModel):
    """Small summary a flow passes on; the weights stay in ``best_path``."""

    checkpoint_dir: str
    best_path: str
    best_sha256: str
    best_step: int
    best_epoch: float
    best_val_dice: float
    best_val_cldice: float
    steps: int
    planned_steps: int
    epochs: float
    stopped_early: bool
    resumed_from_step: int
    n_train: int
    n_val: int
    seconds: float
    history: list[dict[str, float]] = []


# --------------------------------------------------------------------------------- preflight


def preflight_train_pix2pix(run_dir: str | os.PathLike, config: PipelineConfig,
                            soul_h5: str | os.PathLike | None = None) -> Path:
    """Every cheap check before training, each a one-line BrvoError; returns soul.h5's path.

    Nothing is written here, so a refused run never touches an existing checkpoint.
    """
    paths = RunPaths.of(run_dir)
    soul = require_soul_h5(run_dir, config.image_size, num_downs_for, soul_h5)
    meta = read_meta(soul)
    real = meta[~meta["is_synthetic"].astype(bool)]
    counts = {s: real.loc[real["split"] == s, "patient_id"].nunique() for s in ("train", "val", "test")}
    if min(counts.values()) == 0:
        raise BrvoError(
            f"{soul}: {real['patient_id'].nunique()} patient(s), split train/val/test "
            f"{counts['train']}/{counts['val']}/{counts['test']}; Pix2Pix needs at least one patient in each "
            f"for a held-out evaluation: add patients or change val_fraction/test_fraction and re-run preprocess")
    if config.labelled_train_patients is not None:
        train_ids = set(real.loc[real["split"] == "train", "patient_id"].astype(str))
        outside = sorted(set(config.labelled_train_patients) - train_ids)
        if outside:
            raise BrvoError(f"{soul}: labelled_train_patients names {len(outside)} patient(s) not in the train split "
                            f"({', '.join(outside[:5])}); name train patients of this soul.h5")
    expect = CheckpointIdentity(MODEL, config.pix2pix, config.image_size, config.seed).meta
    ckpt_dir = paths.checkpoints(MODEL)
    for name in (LAST, BEST):
        if (ckpt_dir / name).exists():
            load_checkpoint(ckpt_dir / name, expect=expect)  # CheckpointError: interrupted / other config
    return soul


# ------------------------------------------------------------------------------------ data


def load_split(soul: Path, splits: tuple[str, ...],
               patients: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """uint8 images and 0/1 labels of the real rows in ``splits`` (of ``patients`` only, when given), plus their
    meta rows."""
    meta = read_meta(soul)
    keep = meta["split"].isin(splits).to_numpy() & ~meta["is_synthetic"].to_numpy(dtype=bool)
    if patients is not None:
        keep &= meta["patient_id"].astype(str).isin(patients).to_numpy()
    rows = np.flatnonzero(keep)
    images, labels = read_arrays(soul, rows)
    return images, labels, meta.iloc[rows]


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)


def make_batches(images: np.ndarray, labels: np.ndarray, config: PipelineConfig) -> Callable[[int], Any]:
    """``batches(epoch)``: shuffled, aligned-augmented (image, label) batches in [-1, 1], seeded per epoch."""
    imgs = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    labs = torch.from_numpy(np.ascontiguousarray(labels))[:, None]
    p = config.pix2pix
    n, bs = len(imgs), max(1, int(p.batch_size))

    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        order = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = imgs[idx].float().div_(255.0)
            y = labs[idx].float()
            if p.augment:
                x, y = aligned_augment(x, y, g, p.max_rotation_deg)
            yield to_model_range(x), to_model_range(y)

    return batches


# ------------------------------------------------------------------------------------- train


def train_pix2pix(
    run_dir: str | os.PathLike,
    config: PipelineConfig,
    *,
    log: LogFn = run_log,
    on_validation: Callable[[dict[str, float]], None] | None = None,
    max_validations_this_call: int | None = None,
    soul_h5: str | os.PathLike | None = None,
) -> Pix2PixResult:
    """Train (or resume) Pix2Pix on the train split of ``soul_h5`` (default RUN_DIR/soul.h5; only the rows of
    ``config.labelled_train_patients`` when it names them) on the config's schedule, validating on val;
    checkpoints in RUN_DIR."""
    soul = preflight_train_pix2pix(run_dir, config, soul_h5)
    p = config.pix2pix
    seed_everything(config.seed)
    device = select_device(config.device)
    t0 = time.perf_counter()
    train_x, train_y, _ = load_split(soul, ("train",), config.labelled_train_patients)
    val_x, val_y, _ = load_split(soul, ("val",))
    log(f"pix2pix: {len(train_x)} train / {len(val_x)} val images at {config.image_size} px, device {device}, "
        f"ngf {p.ngf} ndf {p.ndf}, batch {p.batch_size} (data loaded in {time.perf_counter() - t0:.1f} s)")
    if p.cuda_graphs and device.type != "cuda":
        log(f"pix2pix: cuda_graphs applies to CUDA devices only; training eagerly on {device}")
    model = Pix2Pix(p, config.image_size, device, val_images=val_x, val_labels=val_y)
    fitted = fit(
        model,
        make_batches(train_x, train_y, config),
        schedule=Schedule.from_config(p, steps_per_epoch(len(train_x), p.batch_size)),
        checkpoint_dir=RunPaths.of(run_dir).checkpoints(MODEL),
        identity=CheckpointIdentity(MODEL, p, config.image_size, config.seed),
        on_validation=on_validation,
        log=log,
        max_validations_this_call=max_validations_this_call,
        checkpoint_every_s=p.checkpoint_every_s,
    )
    best = fitted.best_metrics
    return Pix2PixResult(
        checkpoint_dir=str(fitted.best_path.parent), best_path=str(fitted.best_path),
        best_sha256=fitted.best_sha256, best_step=fitted.best_step, best_epoch=fitted.best_epoch,
        best_val_dice=float(best.get("val_dice", float("nan"))),
        best_val_cldice=float(best.get("val_cldice", float("nan"))),
        steps=fitted.steps, planned_steps=fitted.schedule.total_steps, epochs=fitted.epochs,
        stopped_early=fitted.stopped_early, resumed_from_step=fitted.resumed_from_step,
        n_train=len(train_x), n_val=len(val_x), seconds=round(fitted.seconds, 2), history=fitted.history,
    )


# ---------------------------------------------------------------------------------- evaluate


def mask_scores(masks: np.ndarray, labels: np.ndarray, device: torch.device | None = None) -> dict[str, float]:
    """Mean dice, iou, cldice, mse, ssim, cosine of binary masks vs labels (see METRIC_NOTES), plus n.

    ``device``: computed there in batches (brvo_models.batched_metrics; the GPU path), else one image
    at a time with numpy/skimage (the reference; both agree to 1e-4)."""
    if device is not None:
        return mean_scores(batched_metrics.mask_image_scores(masks, labels, device=device))
    rows = []
    for m, t in zip(masks, labels):
        mf, tf = m.astype(np.float64), t.astype(np.float64)
        rows.append({**label_scores(m, t), "mse": mse(mf, tf), "ssim": ssim(mf, tf, data_range=1.0),
                     "cosine": cosine(mf, tf)})
    return mean_scores(rows)


def evaluate_pix2pix(run_dir: str | os.PathLike, config: PipelineConfig, *, log: LogFn = run_log,
                     score_on: torch.device | str | None = "auto",
                     soul_h5: str | os.PathLike | None = None,
                     baselines_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score best.pt on the test patients against Otsu and Frangi: the report's 'pix2pix' section.

    ``score_on``: where the scores are computed (:func:`brvo_models.batched_metrics.metrics_device`;
    "auto": the GPU when the run's device is CUDA, else the numpy path). ``baselines_cache``: where the
    label baselines are kept by their own key (default: the run directory's); runs that train several
    Pix2Pix recipes on the same data in separate directories share one."""
    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    best_path = paths.checkpoints(MODEL) / BEST
    soul = Path(soul_h5) if soul_h5 is not None else paths.soul_h5
    generator, device = load_labeller(best_path, config.device, config.image_size)
    best_meta = load_checkpoint(best_path)["meta"]
    test_x, test_y, test_meta = load_split(soul, ("test",))
    threshold = config.pix2pix.threshold
    threshold = float(generator.label_threshold) if threshold is None else float(threshold)
    _, masks = label_images(generator, test_x, threshold, batch_size=64, device=device)
    scores_device = batched_metrics.metrics_device(device, score_on)
    model_scores = mask_scores(masks, test_y, scores_device)
    cache = Path(baselines_cache) if baselines_cache is not None else paths.label_baselines_cache
    baselines = label_baselines(soul, config, cache, load_split=load_split,
                                score=lambda m, t: mask_scores(m, t, scores_device),
                                scored_on=str(scores_device or "numpy"), log=log)
    otsu, frangi, segmenter_scores = (baselines["scores"][k] for k in ("otsu", "frangi", "segmenter"))
    section = {
        "test": model_scores,
        "baselines": {"otsu": otsu, "frangi": frangi, "segmenter": segmenter_scores},
        "n_test_patients": int(test_meta["patient_id"].nunique()),
        "image_size": int(config.image_size),
        "threshold": threshold,
        "threshold_source": "config" if config.pix2pix.threshold is not None else "chosen on validation patients",
        "objective": objective_text(config.pix2pix),
        "flip_average": bool(generator.flip_average),
        "checkpoint": {"path": str(best_path), "sha256": checkpoint_sha256(best_path),
                       "step": int(best_meta.get("step", -1)), "epoch": float(best_meta.get("epoch", -1))},
        "frangi_params": baselines["frangi_params"],
        "segmenter_params": baselines["segmenter_params"],
        "metric_notes": METRIC_NOTES,
        "paper_context": PAPER_CONTEXT,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"pix2pix held-out ({model_scores['n']} test images, {section['n_test_patients']} patients): "
        + "; ".join(f"{name} dice {s['dice']:.3f} cldice {s['cldice']:.3f}"
                    for name, s in (("pix2pix", model_scores), ("otsu", otsu), ("frangi", frangi),
                                    ("segmenter", segmenter_scores))))
    return section


# ------------------------------------------------------------------------------------ the step


def train_pix2pix_step(ctx: StepContext, preprocess: PreprocessResult) -> TrainedModel:
    """The 'pix2pix' step: train (resuming only work made for this step's key), then evaluate held out."""
    return train_and_evaluate(ctx, MODEL, train_pix2pix, evaluate_pix2pix, soul_h5=preprocess.path)


TRAIN_PIX2PIX = Step(
    name=MODEL, uses_device=True, run=train_pix2pix_step, result_type=TrainedModel, needs=("preprocess",),
    command=StepCommand("train-pix2pix", "train Pix2Pix (image -> vessel label) on RUN_DIR/soul.h5 (resumes) and "
                        "evaluate on held-out patients", quality_bars=True,
                        preflight=lambda ctx: preflight_train_pix2pix(ctx.run_dir, ctx.config)),
    reads=("soul_h5",), config_fields=("image_size", "seed", "pix2pix", "segmenter_steps", "labelled_train_patients"),
    report=MODEL,
    description="train Pix2Pix (image -> vessel label) on soul.h5; held-out evaluation against baselines")
