"""Test-time flip averaging: a labeller's vessel probability averaged over the four flips of its input.

Why: both labellers train on randomly flipped (image, label) pairs, so each flip of a test image is an
input they were trained on, and their four answers differ only by the errors they make. Averaging those
answers (then un-flipping) cancels part of the error: measured on the validation patients of nine 64 px
generators trained by the demo recipe, Pix2Pix's val Dice rose on all nine, by +0.0062 on average
(docs/robustness-grid.md). The threshold must be chosen on averaged probabilities too, so whether a
labeller averages is part of how it was trained, not a switch to flip at labelling time.
"""
from __future__ import annotations

from typing import Callable

import torch

#: the flips that a horizontal and a vertical flip generate, as the tensor dims to reverse
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``forward`` over the four flips of the batch ``x`` (B, C, H, W), each answer flipped back.

    ``forward`` maps a batch to a same-size batch of probabilities; the mean is taken in float32 and has
    the first answer's dtype. Called per batch, so memory stays that of one batch.
    """
    total = None
    for dims in FLIP_DIMS:
        answer = forward(x.flip(dims) if dims else x)
        answer = answer.flip(dims) if dims else answer
        total = answer.float() if total is None else total + answer.float()
    return (total / len(FLIP_DIMS)).to(answer.dtype)
