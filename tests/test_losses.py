"""Shared loss terms on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from brvo_models.losses import otsu_threshold, soft_density, soft_dice_loss


def test_soft_dice_loss_on_hand_computed_cases():
    label = torch.zeros(2, 1, 4, 4)
    label[0, 0, :2, :2] = 1  # 4 vessel pixels; image 1 has none
    # image 0: 2*4/(4+4) = 1 -> loss 0; image 1: (0+eps)/(0+eps) = 1 -> loss 0
    assert float(soft_dice_loss(label.clone(), label, eps=1e-12)) == pytest.approx(0.0, abs=1e-6)
    half = torch.full((1, 1, 4, 4), 0.5)  # probability 0.5 everywhere vs 4 of 16 pixels vessel
    # 2 * (4 * 0.5) / (16 * 0.5 + 4) = 4 / 12 -> loss 2/3 (eps 0)
    assert float(soft_dice_loss(half, label[:1], eps=0.0)) == pytest.approx(2 / 3)
    # the mean over images: a perfect image and a missed one (no overlap, eps 0) -> 0.5
    missed = torch.zeros(1, 1, 4, 4)
    missed[0, 0, 2:, 2:] = 1
    both = soft_dice_loss(torch.cat([label[:1], missed]), torch.cat([label[:1], label[:1]]), eps=0.0)
    assert float(both) == pytest.approx(0.5)
    # a gradient that raises the probability of a missed vessel pixel
    p = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    soft_dice_loss(p, label[:1]).backward()
    assert p.grad[0, 0, 0, 0] < 0 < p.grad[0, 0, 3, 3]


def test_otsu_threshold_matches_skimage_within_a_bin():
    rng = np.random.default_rng(0)
    for dark, bright, share in ((0.2, 0.7, 0.2), (0.35, 0.55, 0.5), (0.1, 0.9, 0.05)):
        n = 20_000
        x = np.where(rng.random(n) < share, rng.normal(bright, 0.05, n), rng.normal(dark, 0.05, n))
        x = x.clip(0, 1).astype(np.float32)
        assert float(otsu_threshold(torch.from_numpy(x))) == pytest.approx(threshold_otsu(x, nbins=256), abs=1 / 256)


def test_soft_density_is_the_share_above_the_threshold_and_its_gradient_raises_a_missing_density():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 16, 16, generator=g)
    hard = (images > 0.4).float().mean((1, 2, 3))
    assert torch.allclose(soft_density(images, 0.4, 1e-4), hard, atol=1 / 256)
    # an estimate darker than its target: the density term's gradient brightens it (pushes pixels up)
    estimate = (images * 0.5).requires_grad_(True)
    (soft_density(estimate, 0.4, 0.05) - soft_density(images, 0.4, 0.05)).abs().sum().backward()
    assert (estimate.grad <= 0).all() and (estimate.grad < 0).any()
