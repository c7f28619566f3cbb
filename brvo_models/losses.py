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


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold (a 0-d tensor, no gradient) of values in [0, 1], on a ``bins``-bin histogram.

    The threshold that maximises the between-class variance, as skimage's ``threshold_otsu``
    (which it matches to within a bin on a fixture), computed with torch so it runs on the
    device inside a loss without a host round trip.
    """
    v = values.detach().float().flatten().clamp(0.0, 1.0)
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0)
    centres = (torch.arange(bins, device=v.device, dtype=torch.float32) + 0.5) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    s0 = torch.cumsum(hist * centres, 0)
    m0 = s0 / w0.clamp_min(1e-12)
    m1 = (s0[-1] - s0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    return centres[torch.argmax(between)]


def soft_density(images: torch.Tensor, threshold: torch.Tensor | float, softness: float) -> torch.Tensor:
    """Per image (dim 0): the fraction of pixels above ``threshold``, with a sigmoid of width ``softness``
    in place of the step, so it has a gradient. Images in [0, 1].

    A differentiable stand-in for an image's vessel density (bright vessels on a dark background):
    the statistic whose change across treatment stages (reperfusion) the CRGAN's density term trains.
    """
    dims = tuple(range(1, images.ndim))
    return torch.sigmoid((images - threshold) / softness).mean(dims)
