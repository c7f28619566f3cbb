"""Non-learned vessel segmenters that Pix2Pix is held against (issue 3): Otsu and Frangi.

To be fair to them, both see the same uint8 images as the model, and Frangi's free
parameters (scales and threshold on its vesselness) are chosen to maximise mean Dice
on the *training/validation* patients, never on the test patients. Otsu is
parameter-free (one global threshold per image). OCTA vessels are bright on a dark
background, so Frangi runs with ``black_ridges=False``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from skimage.filters import frangi, threshold_otsu

from brvo_models.metrics import batch_dice


#: Candidate scale sets (in pixels) searched on train/val; vessels are 1-4 px wide at 64 px
#: and proportionally wider at larger sizes, so the sets are scaled by image_size / 64.
SIGMA_SETS_64 = ((0.5, 1.0), (0.5, 1.0, 1.5, 2.0), (1.0, 2.0), (1.0, 2.0, 3.0), (1.0, 3.0, 5.0, 7.0, 9.0))
THRESHOLDS = tuple(np.round(np.linspace(0.02, 0.9, 45), 3))


def otsu_masks(images: np.ndarray) -> np.ndarray:
    """Per-image Otsu threshold: pixel > t -> vessel. uint8 0/1 masks, shape of ``images``."""
    images = np.asarray(images)
    out = np.zeros(images.shape, np.uint8)
    for i, img in enumerate(images):
        if img.min() == img.max():
            continue
        out[i] = img > threshold_otsu(img)
    return out


def vesselness(images: np.ndarray, sigmas) -> np.ndarray:
    """Frangi vesselness of bright ridges, each image scaled to max 1 (float32, shape of ``images``)."""
    images = np.asarray(images)
    out = np.zeros(images.shape, np.float32)
    for i, img in enumerate(images):
        v = frangi(img.astype(np.float64) / 255.0, sigmas=sigmas, black_ridges=False)
        peak = float(v.max())
        if peak > 0:
            out[i] = v / peak
    return out


@dataclass(frozen=True)
class FrangiBaseline:
    """Frangi vesselness (per-image max-normalised) thresholded at ``threshold``."""

    sigmas: tuple[float, ...]
    threshold: float
    tuned_dice: float = float("nan")
    n_tuned: int = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        return (vesselness(images, self.sigmas) > self.threshold).astype(np.uint8)

    def params(self) -> dict:
        return asdict(self)

    @classmethod
    def tune(cls, images: np.ndarray, labels: np.ndarray, *, max_images: int = 200, seed: int = 0) -> "FrangiBaseline":
        """Grid search of scales x threshold for the best mean Dice on (train/val) ``images``."""
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) == 0:
            raise ValueError("Frangi tuning needs at least one labelled image")
        if len(images) > max_images:
            pick = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
            images, labels = images[pick], labels[pick]
        scale = images.shape[-1] / 64.0
        best = None
        for base in SIGMA_SETS_64:
            sigmas = tuple(float(round(s * scale, 3)) for s in base)
            v = vesselness(images, sigmas)
            for t in THRESHOLDS:
                score = float(np.mean(batch_dice(v > t, labels)))
                if best is None or score > best[0]:
                    best = (score, sigmas, float(t))
        return cls(sigmas=best[1], threshold=best[2], tuned_dice=best[0], n_tuned=len(images))

