"""The 'crgan' step: train the CRGAN on soul.h5 and evaluate it on held-out real stages against baselines.

Trained on the train patients only (val and test patients are generated from their own observed
images with the 'unknown patient' row), through brvo_models.training.fit (atomic checkpoints, exact
resume); evaluated against nearest-stage copy and neighbour mean. Details: docs/steps.md.
"""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from brvo_models.crgan import CRGAN, MODEL_NAME, load_generator, unet_levels
from brvo_models.crgan_data import (N_STAGES, PatientSequence, heldout_cases, make_train_batches,
                                    sequences_from_arrays, texture_amplitudes)
from brvo_models import batched_metrics
from brvo_models.heldout_gaps import heldout_by_gap
from brvo_models.crgan_sampling import predict_heldout, score_cases
from brvo_models.identity import CheckpointIdentity
from brvo_models.metrics import mean_scores, ssim
from brvo_models.runtime import seed_everything, select_device
from brvo_models.stage_baselines import baseline_predictions
from brvo_models.training import BEST, LAST, Schedule, fit, steps_per_epoch
from storage.checkpoints import checkpoint_sha256, load_checkpoint
from storage.errors import BrvoError, CheckpointError
from storage.paired_format import STAGE_NAMES, read_arrays, read_meta
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.shared.trained_model import TrainedModel, train_and_evaluate
from tasks.shared.preflight import require_soul_h5
from tasks.engine.logs import LogFn, run_log
from tasks.engine import Step, StepCommand, StepContext

if TYPE_CHECKING:
    from tasks.preprocess import PreprocessResult

METRIC_NOTES = (
    "Cases: every observed stage of every val/test patient with at least one other observed stage, hidden "
    "from the context and regenerated from the patient's other stages. Each prediction is compared with EACH "
    "real image of the hidden stage (mse, psnr, ssim, cosine on [0,1] images, data_range 1; ssim: skimage, "
    "Gaussian weights, sigma 1.5), averaged over that stage's images, then over cases. model = the zero-noise "
    "sample (z = 0, pixel noise 0: the model's estimate of the anatomy); model_single_sample = K random-noise "
    "samples (seeds in sample_seeds) each scored alone, averaged. Context "
    "and baselines use each observed stage as the mean of its real images. nearest: copy the nearest observed "
    "stage (tie: earlier). neighbour_mean: mean of the nearest earlier and later observed stages (the nearest "
    "one where one side is empty). Val patients also chose best.pt; 'test_only' repeats the table on test "
    "patients alone."
)


OTHER_IMAGES = 2  # real images per other patient in the own-vs-other figure (bounds its cost)


class CRGANResult(BaseModel):
    """Small summary a flow passes on; the weights stay in ``best_path``."""

    checkpoint_dir: str
    best_path: str
    best_sha256: str
    best_step: int
    best_epoch: float
    best_val_ssim: float
    steps: int
    planned_steps: int
    epochs: float
    stopped_early: bool
    resumed_from_step: int
    n_train_patients: int
    n_val_cases: int
    seconds: float
    history: list[dict[str, float]] = []


# --------------------------------------------------------------------------------- data + preflight


def load_sequences(soul: Path) -> list[PatientSequence]:
    """All real patients of soul.h5 as sequences; train patients get embedding rows 0..n-1 (sorted ids)."""
    meta = read_meta(soul)
    images, _ = read_arrays(soul)
    seqs = sequences_from_arrays(images, meta)
    for i, seq in enumerate(s for s in seqs if s.split == "train"):
        seq.index = i
    return seqs


def preflight_train_crgan(run_dir: str | os.PathLike, config: PipelineConfig,
                          soul_h5: str | os.PathLike | None = None) -> Path:
    """Every cheap check before training, each a one-line BrvoError; returns soul.h5's path.

    Nothing is written here, so a refused run never touches an existing checkpoint.
    """
    paths = RunPaths.of(run_dir)
    soul = require_soul_h5(run_dir, config.image_size, unet_levels, soul_h5)
    seqs = load_sequences(soul)
    train = [s for s in seqs if s.split == "train"]
    val_cases = heldout_cases(s for s in seqs if s.split == "val")
    eval_cases = heldout_cases(s for s in seqs if s.split in ("val", "test"))
    if len(train) < 2 or not val_cases:
        n_val_multi = sum(1 for s in seqs if s.split == "val" and len(s.observed) > 1)
        raise BrvoError(
            f"{soul}: {len(seqs)} patient(s), {len(train)} in train and {n_val_multi} val patient(s) with two or more "
            f"observed stages; CRGAN needs at least 2 train patients and 1 such val patient to hold stages out "
            f"({len(eval_cases)} val/test held-out cases now): add patients or raise val_fraction and re-run preprocess")
    expect = _identity(config, train).meta
    ckpt_dir = paths.checkpoints(MODEL_NAME)
    for name in (LAST, BEST):
        path = ckpt_dir / name
        if path.exists():
            state = load_checkpoint(path, expect={k: v for k, v in expect.items() if k != "patient_ids"})
            if list(state["meta"].get("patient_ids", [])) != expect["patient_ids"]:
                raise CheckpointError(
                    f"{path}: checkpoint was trained on other train patients than {soul} now holds "
                    f"({len(state['meta'].get('patient_ids', []))} vs {len(train)}); "
                    f"use a fresh run directory or delete {ckpt_dir}")
    return soul


def _identity(config: PipelineConfig, train: list[PatientSequence]) -> CheckpointIdentity:
    return CheckpointIdentity(MODEL_NAME, config.crgan, config.image_size, config.seed,
                              {"patient_ids": [s.patient_id for s in train]})


# ------------------------------------------------------------------------------------- train


def train_crgan(
    run_dir: str | os.PathLike,
    config: PipelineConfig,
    *,
    log: LogFn = run_log,
    on_validation: Callable[[dict[str, float]], None] | None = None,
    max_validations_this_call: int | None = None,
    soul_h5: str | os.PathLike | None = None,
) -> CRGANResult:
    """Train (or resume) the CRGAN on the train patients of ``soul_h5`` (default RUN_DIR/soul.h5) on the config's
    schedule, validating on val; checkpoints in RUN_DIR."""
    soul = preflight_train_crgan(run_dir, config, soul_h5)
    c = config.crgan
    seed_everything(config.seed)
    device = select_device(config.device)
    seqs = load_sequences(soul)
    train = [s for s in seqs if s.split == "train"]
    val = [s for s in seqs if s.split == "val"]
    amplitudes = texture_amplitudes(train) if c.texture and c.texture_fit == "moments" else None
    model = CRGAN(c, config.image_size, [s.patient_id for s in train], device, val_seqs=val,
                  texture_amplitudes=amplitudes, train_seqs=train, seed=config.seed)
    if model.course_summary is not None:
        cs = model.course_summary
        log(f"crgan: population course fitted on {cs['pairs']} within-patient stage pairs"
            + (f" (low-pass log-ratio MSE {cs['loss']:.5f})" if cs["fitted"] else ": none, so it stays the identity"))
    log(f"crgan: {len(train)} train patients ({sum(len(s.observed) for s in train)} observed stages), "
        f"{len(model.val_cases)} val held-out cases, {config.image_size} px, device {device}, ngf {c.ngf} "
        f"ndf {c.ndf}, batch {c.batch_size}")
    fitted = fit(
        model,
        lambda epoch: make_train_batches(train, c, config.seed, epoch),
        schedule=Schedule.from_config(c, steps_per_epoch(len(train), c.batch_size, c.repeats)),
        checkpoint_dir=RunPaths.of(run_dir).checkpoints(MODEL_NAME),
        identity=_identity(config, train),
        on_validation=on_validation,
        log=log,
        max_validations_this_call=max_validations_this_call,
        checkpoint_every_s=c.checkpoint_every_s,
    )
    best = fitted.best_metrics
    return CRGANResult(
        checkpoint_dir=str(fitted.best_path.parent), best_path=str(fitted.best_path),
        best_sha256=fitted.best_sha256, best_step=fitted.best_step, best_epoch=fitted.best_epoch,
        best_val_ssim=float(best.get("val_ssim", float("nan"))), steps=fitted.steps,
        planned_steps=fitted.schedule.total_steps, epochs=fitted.epochs, stopped_early=fitted.stopped_early,
        resumed_from_step=fitted.resumed_from_step, n_train_patients=len(train),
        n_val_cases=len(model.val_cases), seconds=round(fitted.seconds, 2), history=fitted.history,
    )


# ---------------------------------------------------------------------------------- evaluate


def _table(rows_by_method: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, rows in rows_by_method.items():
        m = mean_scores(rows)
        m.pop("n", None)
        out[name] = m
    return out


def _heldout_section(cases, scored: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    tab = _table(scored)
    section: dict[str, Any] = {
        "n": len(cases),
        "n_patients": len({seq.patient_id for seq, _ in cases}),
        "n_real_images": int(sum(len(seq.images[s]) for seq, s in cases)),
        "model": tab["model"],
        "model_single_sample": tab["model_single_sample"],
        "baselines": {"nearest": tab["nearest"], "neighbour_mean": tab["neighbour_mean"]},
    }
    per_stage = {}
    for stage in range(N_STAGES):
        idx = [i for i, (_, s) in enumerate(cases) if s == stage]
        if not idx:
            continue
        t = _table({k: [v[i] for i in idx] for k, v in scored.items()})
        per_stage[STAGE_NAMES[stage]] = {"n": len(idx), "model": t["model"], "nearest": t["nearest"],
                                         "neighbour_mean": t["neighbour_mean"]}
    section["per_stage"] = per_stage
    return section


def _pair_ssims(a: np.ndarray, b: np.ndarray, index_a, index_b, device: torch.device | None) -> np.ndarray:
    """SSIM of (a[i], b[j]) for each pair (uint8 read as x / 255): numpy one pair at a time, or batched on ``device``."""
    if device is not None:
        return batched_metrics.paired_scores(a, b, index_a, index_b, ("ssim",), device=device)["ssim"]

    def unit(x: np.ndarray) -> np.ndarray:
        return x / 255.0 if x.dtype == np.uint8 else x

    return np.array([ssim(unit(a[i]), unit(b[j])) for i, j in zip(index_a, index_b)], np.float64)


def _sample_quality(cases, samples: list[np.ndarray], seqs: list[PatientSequence],
                    device: torch.device | None = None) -> dict[str, Any]:
    """Diversity between different-noise samples of one (patient, stage), and own- vs other-patient SSIM.

    Every SSIM is one pair of a pool of samples and a pool of real images, listed first and then
    scored in one call (:func:`_pair_ssims`: batched on ``device``, else numpy), then averaged as
    the notes say."""
    pool = np.concatenate(samples) if samples else np.zeros((0, 1, 1), np.float32)
    first = np.cumsum([0] + [len(s) for s in samples])  # pool index of each case's first sample
    div_a, div_b = [], []
    for c, s in enumerate(samples):
        for i, j in itertools.combinations(range(len(s)), 2):
            div_a.append(first[c] + i)
            div_b.append(first[c] + j)
    pair_div = list(1.0 - _pair_ssims(pool, pool, div_a, div_b, device))
    pix_std = [float(s.std(axis=0).mean()) for s in samples]
    by_stage: dict[int, list[PatientSequence]] = {t: [q for q in seqs if q.images[t] is not None] for t in range(N_STAGES)}
    reals: list[np.ndarray] = []
    slot: dict[tuple[str, int], int] = {}

    def real_index(q: PatientSequence, stage: int, n: int | None = None) -> list[int]:
        if (q.patient_id, stage) not in slot:
            slot[(q.patient_id, stage)] = sum(len(r) for r in reals)
            reals.append(q.images[stage])
        count = len(q.images[stage]) if n is None else min(n, len(q.images[stage]))
        return [slot[(q.patient_id, stage)] + k for k in range(count)]

    # (case, group, pool index of the real image): group -1 = own patient, else the other patient's number
    pairs: list[tuple[int, int, int]] = []
    for c, (seq, stage) in enumerate(cases):
        pairs += [(c, -1, r) for r in real_index(seq, stage)]
        others = [q for q in by_stage[stage] if q.patient_id != seq.patient_id]
        for g, q in enumerate(others):
            pairs += [(c, g, r) for r in real_index(q, stage, OTHER_IMAGES)]
    real_pool = np.concatenate(reals) if reals else np.zeros((0, 1, 1), np.uint8)
    values = _pair_ssims(pool, real_pool, [first[c] for c, _, _ in pairs], [r for _, _, r in pairs], device)
    per_case: list[dict[int, list[float]]] = [{} for _ in cases]
    for (c, g, _), v in zip(pairs, values):
        per_case[c].setdefault(g, []).append(float(v))
    own, other = [], []
    for groups in per_case:
        own.append(np.mean(groups[-1]))
        others = [np.mean(v) for g, v in sorted(groups.items()) if g >= 0]
        if others:
            other.append(np.mean(others))
    return {
        "diversity": float(np.mean(pair_div)) if pair_div else 0.0,
        "diversity_pixel_std": float(np.mean(pix_std)) if pix_std else 0.0,
        "own_vs_other_ssim": {"own": float(np.mean(own)) if own else float("nan"),
                              "other": float(np.mean(other)) if other else float("nan"),
                              "n_cases": len(own)},
        "notes": ("diversity: mean pairwise (1 - SSIM) between the K samples (different noise) of each held-out "
                  "(patient, stage); diversity_pixel_std: mean per-pixel std over those samples ([0,1] scale). "
                  "own/other: SSIM of one generated sample to its own patient's real images at that stage vs to "
                  "every other patient's real images at that stage (all splits; at most 2 per patient), averaged per patient."),
    }


def evaluate_crgan(run_dir: str | os.PathLike, config: PipelineConfig, *, log: LogFn = run_log,
                   score_on: torch.device | str | None = "auto",
                   soul_h5: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score best.pt on held-out real stages of val + test patients against both baselines:
    the report's 'crgan' section. ``score_on``: where the scores are computed
    (:func:`brvo_models.batched_metrics.metrics_device`; "auto": the GPU on CUDA, else numpy)."""
    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    best_path = paths.checkpoints(MODEL_NAME) / BEST
    generator, _, device = load_generator(best_path, config.device, config.image_size)
    best_meta = load_checkpoint(best_path)["meta"]
    seqs = load_sequences(Path(soul_h5) if soul_h5 is not None else paths.soul_h5)
    cases = heldout_cases(s for s in seqs if s.split in ("val", "test"))
    k = max(2, int(config.crgan.eval_samples))
    seeds = [None] + [config.seed + j for j in range(k)]
    preds = predict_heldout(generator, cases, seeds=seeds, device=device)
    scores_device = batched_metrics.metrics_device(device, score_on)
    # every (prediction, case) pair listed first, then scored in one call (batched on a GPU)
    jobs: list[tuple[str, int]] = []
    flat_preds: list[np.ndarray] = []
    flat_reals: list[np.ndarray] = []
    for c, ((seq, stage), pred) in enumerate(zip(cases, preds)):
        named = [("model", pred[0])] + [("sample", x) for x in pred[1:]] + list(baseline_predictions(seq, stage).items())
        for name, image in named:
            jobs.append((name, c))
            flat_preds.append(image)
            flat_reals.append(seq.images[stage])
    rows = score_cases(flat_preds, flat_reals, scores_device)
    by_case: list[dict[str, list[dict[str, float]]]] = [{} for _ in cases]
    for (name, c), row in zip(jobs, rows):
        by_case[c].setdefault(name, []).append(row)
    scored: dict[str, list[dict[str, float]]] = {"model": [], "model_single_sample": [], "nearest": [],
                                                 "neighbour_mean": []}
    for got in by_case:
        single = got["sample"]
        scored["model"].append(got["model"][0])
        scored["model_single_sample"].append({m: float(np.mean([r[m] for r in single])) for m in single[0]})
        scored["nearest"].append(got["nearest"][0])
        scored["neighbour_mean"].append(got["neighbour_mean"][0])
    heldout = _heldout_section(cases, scored)
    # by gap kind, with the course each carries: what the run can say about its fill without any truth
    heldout["per_gap"] = heldout_by_gap(cases, [p[0] for p in preds], scored)
    test_idx = [i for i, (seq, _) in enumerate(cases) if seq.split == "test"]
    if test_idx:
        test_tab = _table({k_: [v[i] for i in test_idx] for k_, v in scored.items()})
        heldout["test_only"] = {"n": len(test_idx), **test_tab}
    heldout["k_samples"] = k
    heldout["sample_seeds"] = seeds[1:]
    heldout["metric_notes"] = METRIC_NOTES
    quality = _sample_quality(cases, [p[1:] for p in preds], seqs, scores_device)
    section = {
        "heldout": heldout,
        "sample_quality": quality,
        "image_size": int(config.image_size),
        "checkpoint": {"path": str(best_path), "sha256": checkpoint_sha256(best_path),
                       "step": int(best_meta.get("step", -1)), "epoch": float(best_meta.get("epoch", -1))},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    m, b = heldout["model"], heldout["baselines"]
    log(f"crgan held-out ({heldout['n']} cases, {heldout['n_patients']} val/test patients): "
        f"model ssim {m['ssim']:.3f} psnr {m['psnr']:.2f}; nearest ssim {b['nearest']['ssim']:.3f} "
        f"psnr {b['nearest']['psnr']:.2f}; neighbour_mean ssim {b['neighbour_mean']['ssim']:.3f} "
        f"psnr {b['neighbour_mean']['psnr']:.2f}; diversity {quality['diversity']:.4f}; own/other ssim "
        f"{quality['own_vs_other_ssim']['own']:.3f}/{quality['own_vs_other_ssim']['other']:.3f}")
    return section


# ------------------------------------------------------------------------------------ the step


def train_crgan_step(ctx: StepContext, preprocess: PreprocessResult) -> TrainedModel:
    """The 'crgan' step: train (resuming only work made for this step's key), then evaluate held out."""
    return train_and_evaluate(ctx, MODEL_NAME, train_crgan, evaluate_crgan, soul_h5=preprocess.path)


TRAIN_CRGAN = Step(
    name=MODEL_NAME, uses_device=True, run=train_crgan_step, result_type=TrainedModel, needs=("preprocess",),
    command=StepCommand("train-crgan", "train CRGAN (stage images) on RUN_DIR/soul.h5 (resumes) and evaluate on "
                        "held-out patients", quality_bars=True,
                        preflight=lambda ctx: preflight_train_crgan(ctx.run_dir, ctx.config)),
    reads=("soul_h5",), config_fields=("image_size", "seed", "crgan"), report=MODEL_NAME,
    description="train the CRGAN (patient + stage + noise -> image); held-out stages against baselines")
