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

    ``forward`` maps a batch to a same-size batch of probabilities and must treat the samples of a batch
    independently (a network in eval mode: BatchNorm on its running statistics, no dropout). The four flips
    go through ``forward`` as one stacked batch of 4B: one call instead of four keeps the cores busy on
    small batches (measured on the demo's validation set, 2 CPU cores: 1.66 s instead of 2.16 s). The mean
    is taken in float32 and has the answer's dtype; memory is that of one batch of 4B.
    """
    b = x.shape[0]
    stacked = torch.cat([x.flip(dims) if dims else x for dims in FLIP_DIMS])
    answers = forward(stacked)
    total = None
    for i, dims in enumerate(FLIP_DIMS):
        answer = answers[i * b:(i + 1) * b]
        answer = (answer.flip(dims) if dims else answer).float()
        total = answer if total is None else total + answer
    return (total / len(FLIP_DIMS)).to(answers.dtype)
