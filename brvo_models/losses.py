"""Loss terms shared by the models (Pix2Pix's optional Dice term, the plain segmenters)."""
from __future__ import annotations

import torch


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images (dim 0) of 1 - soft Dice between probabilities in [0, 1] and 0/1 targets.

    Per image: 1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps). L1's or BCE's per-pixel
    optimum drops thin vessels that are less likely than not; Dice, a ratio over the image,
    rewards their recall. ``eps`` keeps a vessel-free image's loss finite and near 0 when the
    prediction is empty too.
    """
    dims = tuple(range(1, probabilities.ndim))
    inter = (probabilities * targets).sum(dims)
    return (1.0 - (2.0 * inter + eps) / (probabilities.sum(dims) + targets.sum(dims) + eps)).mean()
