"""Batched torch versions of the metrics in :mod:`brvo_models.metrics`, on whatever device the tensors are on.

Why: the numpy/skimage path scores one image at a time on the CPU, and held-out evaluation
after GPU training spent more time there than in training (issue 12). These functions take
(N, H, W) batches (numpy arrays or tensors; a single (H, W) image counts as N = 1), run on the
tensors' device (CPU in CI, CUDA where present) and return one value per image.

The numpy path stays the reference: every function here reproduces its counterpart in
:mod:`brvo_models.metrics` (tests assert agreement to 1e-4, and the skeleton pixel for pixel):

- ``mse``, ``psnr`` (identical images give the 100 dB cap, as there), ``cosine`` (0 where a
  norm is 0), ``dice`` / ``iou`` (two empty masks agree: 1).
- ``ssim``: skimage's ``structural_similarity`` with ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False`` and an explicit ``data_range``. skimage filters with
  ``scipy.ndimage.gaussian_filter(truncate=3.5)``, an 11-tap window for sigma 1.5
  (radius int(3.5 * 1.5 + 0.5) = 5), then crops (11 - 1) // 2 = 5 pixels at every border
  before averaging. Every kept pixel's window lies inside the image, so a 'valid' separable
  filter (two banded matmuls) gives the same map without any border rule. torchmetrics 1.9's
  SSIM was measured against skimage with the same settings and differs by 1.3e-3 at 64 px
  (1.4e-4 at 256 px): it reflect-pads and averages the border pixels that skimage crops, so it
  is not used.
- ``cldice`` with :func:`skeletonize`, a port of skimage's 2-D ``skeletonize`` (Zhang-Suen
  thinning with skimage's own 256-entry lookup table, two sub-passes per iteration, each
  reading the image as it was at the start of the sub-pass), iterated until an iteration
  removes nothing. On CPU tensors skimage itself is called per mask (measured faster there);
  the port runs on CUDA.

Arithmetic is float64 by default, as the numpy path; ``dtype=torch.float32`` is accepted for
the image metrics where a GPU is slow at float64.

When to use: on CUDA tensors. On this project's 2-core CPU machine the per-image numpy loop
was as fast or faster for every metric but SSIM at 64 px (benchmarks/metrics_bench.py: the
per-image arrays stay in cache, torch's CPU reductions over bool masks are slow, and torch's
threads contend on a loaded machine), so CPU callers lose nothing by keeping brvo_models.metrics.

Aggregation: :func:`mean_batch_scores` gives what ``metrics.mean_scores`` gives for the
same images' rows (metric means plus ``n``); :func:`rows` turns a batch result into those rows.

Evaluations choose the path with :func:`metrics_device`: the run's device when it is a GPU, else
None (the numpy path). :func:`paired_scores` scores many (a[i], b[j]) pairs drawn from two image
pools (each pool copied to the device once, pairs gathered there in chunks): what the held-out
CRGAN scores, the sample-quality SSIMs and the scoring step's consistency SSIM need.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

#: Same epsilon as metrics.cldice's denominators.
_EPS = 1e-8
#: PSNR reported for identical images (metrics.psnr's cap; skimage gives +inf).
PSNR_CAP_DB = 100.0
#: skimage's SSIM constants and Gaussian window (sigma 1.5, truncate 3.5 -> 11 taps).
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_SSIM_SIGMA, _SSIM_TRUNCATE = 1.5, 3.5
SSIM_WIN_SIZE = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1

# Zhang-Suen removal classes of the 8-neighbourhood code, as used by skimage's
# ``_fast_skeletonize`` (scikit-image, BSD-3-Clause: skimage/morphology/_skeletonize_various_cy.pyx).
# Code = NW + 2 N + 4 NE + 8 E + 16 SE + 32 S + 64 SW + 128 W. Class 1: removable in the first
# sub-pass, 2: in the second, 3: in both, 0: kept. It is skimage's own table, not the textbook
# conditions (B in 2..6, A == 1 give a different table), so it is carried as data; the tests check
# the port against skimage on all 256 neighbourhoods and on vessel-like images.
_ZHANG_LUT = (
    0, 0, 0, 1, 0, 0, 1, 3, 0, 0, 3, 1, 1, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 3, 0, 3, 3,
    0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 2, 2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, 0,
    0, 0, 3, 1, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 1, 3, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 0, 1, 0, 0, 0, 0, 2, 2, 0, 0, 2, 0, 0, 0,
)
# (row offset, column offset, weight) of each neighbour in the code above.
_NEIGHBOURS = ((-1, -1, 1), (-1, 0, 2), (-1, 1, 4), (0, 1, 8), (1, 1, 16), (1, 0, 32), (1, -1, 64), (0, -1, 128))


def as_batch(x, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, H, W) tensor from a numpy array or tensor; (H, W) becomes N = 1.

    A tensor stays on its device unless ``device`` is given; a numpy array goes to ``device``
    (CPU by default).
    """
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    if dtype is not None:
        t = t.to(dtype)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"expected an (N, H, W) batch or one (H, W) image, got shape {tuple(t.shape)}")
    return t


def _pair(a, b, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_batch(a, device=device, dtype=dtype)
    b = as_batch(b, device=a.device if device is None else device, dtype=dtype)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _masks(pred, truth, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    p = as_batch(pred, device=device)
    t = as_batch(truth, device=p.device if device is None else device)
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p != 0, t != 0


# ---------------------------------------------------------------- image metrics


def mse(a, b, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Per-image mean squared error, shape (N,)."""
    a, b = _pair(a, b, dtype, device)
    return (a - b).square().flatten(1).mean(dim=1)


def psnr(a, b, data_range: float = 1.0, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Per-image PSNR in dB; identical images give :data:`PSNR_CAP_DB` (metrics.psnr's convention)."""
    err = mse(a, b, dtype=dtype, device=device)
    value = 10.0 * torch.log10(torch.as_tensor(data_range, dtype=err.dtype, device=err.device) ** 2 / err)
    return torch.where(err == 0, torch.full_like(err, PSNR_CAP_DB), value)


def _gaussian_taps(dtype: torch.dtype, device) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's 1-D kernel for sigma 1.5, truncate 3.5 (normalised to sum 1)."""
    radius = (SSIM_WIN_SIZE - 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / _SSIM_SIGMA**2 * x**2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _valid_filter_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """(length - k + 1, length) banded matrix: row i holds the taps at columns i .. i + k - 1.

    ``A @ x`` is the 'valid' correlation of x with the taps along that axis. Measured on the CPU,
    two such matmuls beat grouped float64 conv2d (which has no fast CPU kernel) by 10-40x.
    """
    k = taps.numel()
    rows = torch.arange(length - k + 1, device=taps.device)
    m = torch.zeros((length - k + 1, length), dtype=taps.dtype, device=taps.device)
    for j in range(k):
        m[rows, rows + j] = taps[j]
    return m


def ssim(a, b, data_range: float = 1.0, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Per-image SSIM equal to metrics.ssim (skimage, Gaussian sigma 1.5, population covariance).

    With ``dtype=torch.float32`` on CUDA, the filtering matmuls use TF32 where
    ``torch.backends.cuda.matmul.allow_tf32`` is on, which costs accuracy; float64 does not.
    """
    a, b = _pair(a, b, dtype, device)
    n, h, w = a.shape
    if min(h, w) < SSIM_WIN_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} px, got {h}x{w}")
    taps = _gaussian_taps(a.dtype, a.device)
    rows, cols = _valid_filter_matrix(h, taps), _valid_filter_matrix(w, taps)
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=1)  # (N, 5, H, W)
    filt = rows @ stack @ cols.T  # (N, 5, H - 10, W - 10): the pixels skimage keeps after its crop
    ux, uy, uxx, uyy, uxy = filt.unbind(dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def cosine(a, b, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Per-image cosine similarity of the flattened images; 0 where either image is all zeros."""
    a, b = _pair(a, b, dtype, device)
    a, b = a.flatten(1), b.flatten(1)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    dot = (a * b).sum(dim=1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))


# ---------------------------------------------------------------- label metrics


def dice(pred, truth, *, device=None) -> torch.Tensor:
    """Per-image Dice 2|P∩T| / (|P|+|T|) as float64; two empty masks give 1."""
    p, t = _masks(pred, truth, device)
    inter = (p & t).flatten(1).sum(dim=1).double()
    total = (p.flatten(1).sum(dim=1) + t.flatten(1).sum(dim=1)).double()
    return torch.where(total == 0, torch.ones_like(total), 2.0 * inter / total.clamp(min=1))


def iou(pred, truth, *, device=None) -> torch.Tensor:
    """Per-image intersection over union as float64; two empty masks give 1."""
    p, t = _masks(pred, truth, device)
    inter = (p & t).flatten(1).sum(dim=1).double()
    union = (p | t).flatten(1).sum(dim=1).double()
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp(min=1))


def skeletonize(masks, *, device=None, backend: str = "auto") -> torch.Tensor:
    """skimage.morphology.skeletonize (2-D, Zhang) of each mask in an (N, H, W) batch, as bool.

    ``backend``: "torch" runs the vectorised port (:func:`_skeletonize_torch`) on the masks'
    device; "skimage" calls skimage per mask on the host; "auto" (default) uses skimage for CPU
    tensors, where its compiled loop was measured 5-15x faster than the port, and the port
    elsewhere (CUDA). Both give the same pixels (tested on every 3x3 neighbourhood).
    """
    x = as_batch(masks, device=device) != 0
    if backend not in ("auto", "torch", "skimage"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'skimage', got {backend!r}")
    if backend == "skimage" or (backend == "auto" and x.device.type == "cpu"):
        from skimage.morphology import skeletonize as sk_skeletonize

        host = x.cpu().numpy()
        out = np.stack([sk_skeletonize(m) for m in host]) if len(host) else host.copy()
        return torch.from_numpy(out).to(x.device)
    return _skeletonize_torch(x)


def _skeletonize_torch(x: torch.Tensor) -> torch.Tensor:
    """The port: skimage's ``_fast_skeletonize`` as whole-batch tensor steps.

    Each sub-pass computes every pixel's neighbourhood code from the image as it stood at the
    start of the sub-pass (as skimage's loop does: it reads ``skeleton`` and writes
    ``cleaned_skeleton``), so a sub-pass is one vectorised step. Pixels outside the image count as
    background (skimage pads by one zero pixel; so does the buffer here). Iterates until a full
    iteration (both sub-passes) removes nothing in any mask; a mask that is already stable stays
    unchanged, so batching does not change any result.
    """
    n, h, w = x.shape
    lut = torch.tensor(_ZHANG_LUT, dtype=torch.uint8, device=x.device)
    removable = ((lut == 1) | (lut == 3), (lut == 2) | (lut == 3))  # first, second sub-pass
    padded = torch.zeros((n, h + 2, w + 2), dtype=torch.uint8, device=x.device)
    inner = padded[:, 1:-1, 1:-1]
    inner.copy_(x)
    count = int(inner.sum())
    while True:
        for remove_class in removable:
            code = torch.zeros((n, h, w), dtype=torch.uint8, device=x.device)  # at most 255: fits
            for dr, dc, weight in _NEIGHBOURS:
                code.add_(padded[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w], alpha=weight)
            inner.mul_(~remove_class[code.long()])  # background stays 0 whatever its code
        remaining = int(inner.sum())  # pixels are only ever removed: same count = nothing changed
        if remaining == count:
            return inner.bool()
        count = remaining


def cldice(pred, truth, *, device=None, skeleton_backend: str = "auto") -> torch.Tensor:
    """Per-image centerline Dice (metrics.cldice): harmonic mean of Tprec and Tsens, float64.

    Two empty masks give 1; Tprec + Tsens = 0 gives 0. ``skeleton_backend``: see :func:`skeletonize`.
    """
    p, t = _masks(pred, truth, device)
    sk = skeletonize(torch.cat([p, t]), backend=skeleton_backend)
    sp, st = sk[: len(p)], sk[len(p):]

    def frac(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num.flatten(1).sum(dim=1).double() / (den.flatten(1).sum(dim=1).double() + _EPS)

    tprec, tsens = frac(sp & t, sp), frac(st & p, st)
    both = tprec + tsens
    value = torch.where(both == 0, torch.zeros_like(both), 2.0 * tprec * tsens / torch.where(both == 0, 1.0, both))
    both_empty = ~(p.flatten(1).any(dim=1) | t.flatten(1).any(dim=1))
    return torch.where(both_empty, torch.ones_like(value), value)


# ---------------------------------------------------------------- bundles and aggregation

IMAGE_METRICS = {"mse": mse, "psnr": psnr, "ssim": ssim, "cosine": cosine}
LABEL_METRICS = {"dice": dice, "iou": iou, "cldice": cldice}


def image_scores(pred, truth, data_range: float = 1.0, *, dtype: torch.dtype = torch.float64,
                 device=None) -> dict[str, torch.Tensor]:
    """Per-image mse, psnr, ssim, cosine (same keys as metrics.image_scores), each of shape (N,)."""
    a, b = _pair(pred, truth, dtype, device)
    return {"mse": mse(a, b, dtype=dtype), "psnr": psnr(a, b, data_range, dtype=dtype),
            "ssim": ssim(a, b, data_range, dtype=dtype), "cosine": cosine(a, b, dtype=dtype)}


def label_scores(pred, truth, *, device=None, skeleton_backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-image dice, iou, cldice (same keys as metrics.label_scores), each of shape (N,)."""
    p, t = _masks(pred, truth, device)
    return {"dice": dice(p, t), "iou": iou(p, t), "cldice": cldice(p, t, skeleton_backend=skeleton_backend)}


def rows(scores: Mapping[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per-image dicts, as the numpy path's ``[image_scores(p, t) for ...]`` gives (one host copy)."""
    host = {k: v.detach().double().cpu().numpy() for k, v in scores.items()}
    n = len(next(iter(host.values()))) if host else 0
    return [{k: float(v[i]) for k, v in host.items()} for i in range(n)]


def mean_batch_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each metric over the batch plus ``n``: what metrics.mean_scores gives for the same rows."""
    n = len(next(iter(scores.values()))) if scores else 0
    if n == 0:
        return {"n": 0}
    out = {k: float(v.detach().double().mean()) for k, v in scores.items()}
    out["n"] = n
    return out


# ---------------------------------------------------------------- where evaluations score


def metrics_device(run_device: torch.device | str | None,
                   score_on: torch.device | str | None = "auto") -> torch.device | None:
    """The device held-out scores are computed on, or None for the numpy path of :mod:`brvo_models.metrics`.

    ``score_on`` "auto" (what runs use): the run's device when it is a CUDA device, else None (the
    numpy path is the reference, and on the CPU as fast or faster than this module). None: the
    numpy path. A device: this module's path on it (tests force it on the CPU to hold it to the
    numpy path).
    """
    if isinstance(score_on, str) and score_on == "auto":
        if run_device is None:
            return None
        run_device = torch.device(run_device)
        return run_device if run_device.type == "cuda" else None
    return None if score_on is None else torch.device(score_on)


def _pool(images, device: torch.device) -> torch.Tensor:
    """An (N, H, W) image pool on ``device`` in its own dtype (uint8 stays uint8 until gathered)."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(images))
    if t.ndim != 3:
        raise ValueError(f"expected an (N, H, W) image pool, got shape {tuple(t.shape)}")
    return t.to(device)


def _unit_range(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images read as x / 255 (as the numpy path's ``r / 255.0``); floats as they are."""
    return x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)


def paired_scores(a, b, index_a, index_b, metrics=("mse", "psnr", "ssim", "cosine"), *, device,
                  data_range: float = 1.0, chunk: int = 64, dtype: torch.dtype = torch.float64) -> dict[str, np.ndarray]:
    """Image metrics of the pairs (a[index_a[i]], b[index_b[i]]), one value per pair, as numpy arrays.

    ``a`` and ``b``: (N, H, W) pools, floats in [0, 1] or uint8 (read as x / 255). Each pool is
    copied to ``device`` once; pairs are gathered and scored there ``chunk`` at a time (bounded
    memory: an SSIM chunk of 64 pairs at 256 px is about 170 MB in float64).
    """
    index_a = np.asarray(index_a, np.int64)
    index_b = np.asarray(index_b, np.int64)
    if index_a.shape != index_b.shape or index_a.ndim != 1:
        raise ValueError(f"index_a and index_b must be 1-D and of one length, got {index_a.shape} and {index_b.shape}")
    unknown = [m for m in metrics if m not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(IMAGE_METRICS)}")
    device = torch.device(device)
    pool_a, pool_b = _pool(a, device), _pool(b, device)
    out: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    ia, ib = torch.from_numpy(index_a).to(device), torch.from_numpy(index_b).to(device)
    for start in range(0, len(index_a), chunk):
        x = _unit_range(pool_a[ia[start:start + chunk]], dtype)
        y = _unit_range(pool_b[ib[start:start + chunk]], dtype)
        for m in metrics:
            fn = IMAGE_METRICS[m]
            value = fn(x, y, data_range, dtype=dtype) if m in ("psnr", "ssim") else fn(x, y, dtype=dtype)
            out[m].append(value.double().cpu().numpy())
    return {m: np.concatenate(v) if v else np.zeros(0) for m, v in out.items()}


def mask_image_scores(masks, labels, *, device, chunk: int = 64) -> list[dict[str, float]]:
    """Per mask: dice, iou, cldice of the mask vs its label, and mse, ssim, cosine of the two as 0/1 images
    (data_range 1): the rows the numpy path computes one mask at a time, in that key order. Skeletons
    by the tensor port on every device, so a CPU test runs what CUDA runs."""
    device = torch.device(device)
    rows_out: list[dict[str, float]] = []
    for start in range(0, len(masks), chunk):
        m = as_batch(np.asarray(masks[start:start + chunk]), device=device)
        t = as_batch(np.asarray(labels[start:start + chunk]), device=device)
        mf, tf = m.to(torch.float64), t.to(torch.float64)
        scores = {**label_scores(m, t, skeleton_backend="torch"), "mse": mse(mf, tf), "ssim": ssim(mf, tf, 1.0),
                  "cosine": cosine(mf, tf)}
        rows_out += rows(scores)
    return rows_out
