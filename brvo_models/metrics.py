"""Image and label metrics (docs/design.md, section 7).

Image metrics take float arrays in [0, 1] (data_range=1 unless given); label
metrics take binary masks. SSIM is skimage's with Gaussian weights, sigma 1.5
and an explicit data_range, as in the seed project.

This per-image numpy path is the reference. brvo_models.batched_metrics computes the
same numbers for (N, H, W) batches on the tensors' device (CUDA where present), and its
tests hold it to this module within 1e-4; distribution-level quality of synthetic images
(KID, precision/recall/density/coverage) is in brvo_models.image_quality.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from skimage.morphology import skeletonize

_EPS = 1e-8


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(mean_squared_error(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB; identical images give +inf (skimage's convention), capped to 100 dB for averaging."""
    err = mse(a, b)
    if err == 0:
        return 100.0
    return float(peak_signal_noise_ratio(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=data_range))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    return float(
        structural_similarity(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P∩T| / (|P|+|T|); two empty masks agree perfectly (1.0)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def batch_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of (N, H, W) masks, vectorised, with :func:`dice`'s convention (empty/empty = 1)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    axes = tuple(range(1, p.ndim))
    inter = np.logical_and(p, t).sum(axis=axes)
    total = p.sum(axis=axes) + t.sum(axis=axes)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


#: Label thresholds searched on validation patients (Pix2Pix, the supervised segmenter, their flip averages).
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def choose_threshold(probs, labels, per_image_dice=batch_dice) -> tuple[float, float]:
    """(threshold, mean Dice): the :data:`THRESHOLD_GRID` value maximising mean per-image Dice of ``probs > t``.

    One rule for every labeller, so that a threshold chosen for Pix2Pix and one chosen for a baseline
    are chosen alike. ``probs`` may be a numpy array (with :func:`batch_dice`) or a tensor (with a
    ``per_image_dice`` that returns a host array, as :mod:`brvo_models.batched_metrics` does on a device);
    each grid value is compared as the float64 it is, so float32 probabilities compare as numpy compares them.
    """
    scores = [float(np.mean(per_image_dice(probs > t, labels))) for t in THRESHOLD_GRID]
    best = int(np.argmax(scores))
    return float(THRESHOLD_GRID[best]), scores[best]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Centerline Dice (Shit et al. 2021): harmonic mean of topology precision and sensitivity.

    Tprec = |S(P) ∩ T| / |S(P)|, Tsens = |S(T) ∩ P| / |S(T)| with S the skeleton.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 1.0
    sp, st = skeletonize(p), skeletonize(t)
    tprec = (sp & t).sum() / (sp.sum() + _EPS)
    tsens = (st & p).sum() / (st.sum() + _EPS)
    if tprec + tsens == 0:
        return 0.0
    return float(2.0 * tprec * tsens / (tprec + tsens))


def _within(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` px of ``mask`` (chessboard distance: diagonal neighbours count)."""
    if tolerance <= 0 or not mask.any():
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=tolerance)


def tolerant_dice(pred: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """Dice that forgives a vessel drawn ``tolerance`` px off: the F1 of precision |P ∩ T+| / |P| and
    recall |T ∩ P+| / |T|, where X+ is X dilated by ``tolerance`` px.

    Why: two scans of one retina at 64 px draw a thin vessel a pixel apart (a line of dots), so exact
    overlap says little about whether a label found the vessels. Tolerance 0 is :func:`dice`; two empty
    masks agree (1.0), one empty mask scores 0.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    precision = (p & _within(t, tolerance)).sum() / p.sum()
    recall = (t & _within(p, tolerance)).sum() / t.sum()
    return 0.0 if precision + recall == 0 else float(2.0 * precision * recall / (precision + recall))


def tolerant_cldice(pred: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """:func:`cldice` with each skeleton matched against the other mask dilated by ``tolerance`` px:
    Tprec = |S(P) ∩ T+| / |S(P)|, Tsens = |S(T) ∩ P+| / |S(T)|. Tolerance 0 is :func:`cldice`."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 1.0
    sp, st = skeletonize(p), skeletonize(t)
    tprec = (sp & _within(t, tolerance)).sum() / (sp.sum() + _EPS)
    tsens = (st & _within(p, tolerance)).sum() / (st.sum() + _EPS)
    if tprec + tsens == 0:
        return 0.0
    return float(2.0 * tprec * tsens / (tprec + tsens))


IMAGE_METRICS = {"mse": mse, "psnr": psnr, "ssim": ssim, "cosine": cosine}
LABEL_METRICS = {"dice": dice, "iou": iou, "cldice": cldice}


def image_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {name: fn(pred, truth) for name, fn in IMAGE_METRICS.items()}


def label_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {name: fn(pred, truth) for name, fn in LABEL_METRICS.items()}


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over rows, plus n."""
    if not rows:
        return {"n": 0}
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["n"] = len(rows)
    return out
