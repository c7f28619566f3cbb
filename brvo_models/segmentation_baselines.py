"""Non-learned vessel segmenters that Pix2Pix is held against (issue 3): Otsu and Frangi.

To be fair to them, both see the same uint8 images as the model, and Frangi's free
parameters (scales and threshold on its vesselness) are chosen to maximise mean Dice
on the *training/validation* patients, never on the test patients. Otsu is
parameter-free (one global threshold per image). OCTA vessels are bright on a dark
background, so Frangi runs with ``black_ridges=False``.

What Frangi costs, and how it is bounded: the scales grow with the image (vessels are wider
in pixels), and a Gaussian filter's cost with its scale, so one image at 256 px costs about
16 x 4 = 64 times one at 64 px. Tuning therefore runs on a fixed, seeded subsample sized by a
pixel budget (:func:`tuning_sample_size`: 200 images at 64 px and below, as before, and
proportionally fewer above, never fewer than 32), and vesselness is computed image by image
through an optional ``map_fn`` (a process pool's ``map``; images are independent, so the
result does not depend on it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
from skimage.filters import frangi, threshold_otsu

from brvo_models.metrics import batch_dice


#: Candidate scale sets (in pixels) searched on train/val; vessels are 1-4 px wide at 64 px
#: and proportionally wider at larger sizes, so the sets are scaled by image_size / 64.
SIGMA_SETS_64 = ((0.5, 1.0), (0.5, 1.0, 1.5, 2.0), (1.0, 2.0), (1.0, 2.0, 3.0), (1.0, 3.0, 5.0, 7.0, 9.0))
THRESHOLDS = tuple(np.round(np.linspace(0.02, 0.9, 45), 3))
#: Tuning sample: 200 images of 64 x 64 px worth of pixels, at most 200 and at least 32 images.
TUNING_PIXELS = 200 * 64 * 64
MAX_TUNING_IMAGES, MIN_TUNING_IMAGES = 200, 32
#: Images per task handed to ``map_fn``.
CHUNK = 4

MapFn = Callable[[Callable, Iterable], Iterable]


def tuning_sample_size(image_size: int, max_images: int = MAX_TUNING_IMAGES,
                       min_images: int = MIN_TUNING_IMAGES) -> int:
    """Images Frangi is tuned on at ``image_size`` px: the pixel budget's worth, within [min_images, max_images]."""
    return int(min(max_images, max(min_images, TUNING_PIXELS // (int(image_size) ** 2))))


def otsu_masks(images: np.ndarray) -> np.ndarray:
    """Per-image Otsu threshold: pixel > t -> vessel. uint8 0/1 masks, shape of ``images``."""
    images = np.asarray(images)
    out = np.zeros(images.shape, np.uint8)
    for i, img in enumerate(images):
        if img.min() == img.max():
            continue
        out[i] = img > threshold_otsu(img)
    return out


def vesselness(images: np.ndarray, sigmas, map_fn: MapFn = map) -> np.ndarray:
    """Frangi vesselness of bright ridges, each image scaled to max 1 (float32, shape of ``images``).

    ``map_fn``: how chunks of CHUNK images are mapped (a process pool's ``map`` runs them in parallel).
    """
    images = np.asarray(images)
    if map_fn is not map and len(images) > CHUNK:
        parts = list(map_fn(_vesselness_of, [(images[i:i + CHUNK], tuple(sigmas))
                                             for i in range(0, len(images), CHUNK)]))
        return np.concatenate(parts)
    out = np.zeros(images.shape, np.float32)
    for i, img in enumerate(images):
        v = frangi(img.astype(np.float64) / 255.0, sigmas=sigmas, black_ridges=False)
        peak = float(v.max())
        if peak > 0:
            out[i] = v / peak
    return out


def _vesselness_of(job: tuple[np.ndarray, tuple[float, ...]]) -> np.ndarray:
    """One chunk's vesselness (module level, so a process pool can run it)."""
    images, sigmas = job
    return vesselness(images, sigmas)


@dataclass(frozen=True)
class FrangiBaseline:
    """Frangi vesselness (per-image max-normalised) thresholded at ``threshold``."""

    sigmas: tuple[float, ...]
    threshold: float
    tuned_dice: float = float("nan")
    n_tuned: int = 0

    def predict(self, images: np.ndarray, map_fn: MapFn = map) -> np.ndarray:
        return (vesselness(images, self.sigmas, map_fn) > self.threshold).astype(np.uint8)

    def params(self) -> dict:
        return asdict(self)

    @classmethod
    def tune(cls, images: np.ndarray, labels: np.ndarray, *, max_images: int | None = None, seed: int = 0,
             map_fn: MapFn = map) -> "FrangiBaseline":
        """Grid search of scales x threshold for the best mean Dice on (train/val) ``images``.

        On a seeded subsample of ``max_images`` (default :func:`tuning_sample_size` of the image
        size) when there are more; ``map_fn`` as in :func:`vesselness`.
        """
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) == 0:
            raise ValueError("Frangi tuning needs at least one labelled image")
        if max_images is None:
            max_images = tuning_sample_size(images.shape[-1])
        if len(images) > max_images:
            pick = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
            images, labels = images[pick], labels[pick]
        scale = images.shape[-1] / 64.0
        best = None
        for base in SIGMA_SETS_64:
            sigmas = tuple(float(round(s * scale, 3)) for s in base)
            v = vesselness(images, sigmas, map_fn)
            for t in THRESHOLDS:
                score = float(np.mean(batch_dice(v > t, labels)))
                if best is None or score > best[0]:
                    best = (score, sigmas, float(t))
        return cls(sigmas=best[1], threshold=best[2], tuned_dice=best[0], n_tuned=len(images))

