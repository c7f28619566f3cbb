"""One repeat scan of a stage: what the OCTA device adds on top of the anatomy.

Why apart from the anatomy: SOUL has up to eight scans of one visit; they differ by a
small fixation shift and by acquisition noise, not by anatomy. The noise is the
``noise`` knob of the config (speckle, additive noise, motion lines).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: At noise 1: multiplicative speckle amplitude, additive noise sigma (grey levels), motion lines per scan.
SPECKLE = 0.4
ADDITIVE_SIGMA = 5.0
MOTION_LINES = (0, 1, 1, 2, 2, 3)


def acquire_exam(stage_img: np.ndarray, stage_label: np.ndarray, size: int, pad: int,
                 rng: np.random.Generator, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One repeat scan of a stage -> (uint8 image, uint8 0/255 label).

    A shift of at most ~3 px (at 304) applied to both, then, on the image only, speckle,
    a small gain change and 0-3 full-width motion lines. ``noise`` multiplies the
    speckle, the additive noise and the number of motion lines (0: a clean scan).
    """
    max_shift = max(1, round(3 * size / 304))
    oy, ox = pad + rng.integers(-max_shift, max_shift + 1, 2)
    img = stage_img[oy:oy + size, ox:ox + size].copy()
    label = stage_label[oy:oy + size, ox:ox + size]
    speckle = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.6 * size / 304)
    img = img * (1 + SPECKLE * noise * speckle) + rng.normal(0, ADDITIVE_SIGMA * noise, (size, size))
    img *= rng.uniform(0.96, 1.04)
    for _ in range(round(int(rng.choice(MOTION_LINES)) * noise)):  # horizontal motion artefacts, full width
        row = int(rng.integers(0, size))
        h = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            img[row:row + h] = img[row:row + h] * 0.3 + rng.uniform(120, 200)  # bright decorrelation line
        else:
            img[row:row + h] *= rng.uniform(0.1, 0.4)  # dark line (blink, signal loss)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), (label.astype(np.uint8) * 255)
