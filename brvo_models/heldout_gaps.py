"""What a run can say about its fill without any truth: the held-out observed stages, split by the kind of gap.

Why: on a clinic's data the missed visits are unknown, so the only check of a fill is to hide stages that
were observed and fill them. Interpolation (a stage between two visits) is easier than extrapolation (a stage
after the last visit, SOUL's common gap), so one pooled score hides the case that matters. Per gap kind this
gives the image scores of the model's zero-noise estimate beside nearest copy and neighbour mean, and the
course: the change in the non-perfusion index (:func:`brvo_models.fill_truth.non_perfusion_index`) from the
nearest other observed stage, the estimate's against the real stage's, as the share carried (slope through the
origin) and the offset. docs/fill-truth.md measures how well these estimates tracked the truth on phantoms.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from brvo_models.crgan_data import PatientSequence
from brvo_models.fill_truth import course_fit, gap_kind, nearest_observed, non_perfusion_index

GAP_KINDS = ("interior", "after_last", "before_first")


def _uint8(image: np.ndarray) -> np.ndarray:
    return image if image.dtype == np.uint8 else np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _stage_index(seq: PatientSequence, stage: int) -> float:
    return float(np.mean([non_perfusion_index(x) for x in seq.images[stage]]))


def heldout_by_gap(cases: Sequence[tuple[PatientSequence, int]], estimates: Sequence[np.ndarray],
                   scored: dict[str, list[dict[str, float]]]) -> dict[str, dict]:
    """{gap kind: {n, ssim/psnr of model, nearest, neighbour_mean, course}} for the held-out cases.

    ``estimates``: the zero-noise estimate of each case (float [0, 1] or uint8); ``scored``: per method
    ('model', 'nearest', 'neighbour_mean') one score row per case, as the held-out evaluation computed them.
    Kinds with no case are left out. ``course.carried`` is None where the real change is zero for every case.
    """
    kinds = [gap_kind([o for o in seq.observed if o != s], s) for seq, s in cases]
    out: dict[str, dict] = {}
    for kind in GAP_KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        section: dict = {"n": len(idx), "n_patients": len({cases[i][0].patient_id for i in idx})}
        for name in ("model", "nearest", "neighbour_mean"):
            rows = [scored[name][i] for i in idx]
            section[name] = {m: float(np.mean([r[m] for r in rows])) for m in ("ssim", "psnr")}
        real_change, model_change = [], []
        for i in idx:
            seq, stage = cases[i]
            nearest = nearest_observed([o for o in seq.observed if o != stage], stage)
            reference = _stage_index(seq, nearest)
            real_change.append(_stage_index(seq, stage) - reference)
            model_change.append(non_perfusion_index(_uint8(np.asarray(estimates[i]))) - reference)
        fit = course_fit(np.array(model_change), np.array(real_change))
        section["course"] = {"real_change_mean": float(np.mean(real_change)),
                             "model_change_mean": float(np.mean(model_change)),
                             "carried": fit["slope_through_origin"], "offset": fit["offset"]}
        out[kind] = section
    return out
