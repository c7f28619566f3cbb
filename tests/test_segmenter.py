"""The supervised segmenter (third label baseline): it learns, is reproducible, and keeps its budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brvo_models.metrics import batch_dice, choose_threshold
from brvo_models.segmenter import (VesselSegmenter, evaluate_segmenter, fit_segmenter,
                                   predict_probabilities, train_segmenter)

SIZE = 32


def separable_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random straight 'vessels' 2 px wide, bright on a dark noisy background: trivially separable."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, SIZE, SIZE), np.uint8)
    for lab in labels:
        for _ in range(3):
            if rng.random() < 0.5:
                r = rng.integers(2, SIZE - 3)
                lab[r:r + 2, :] = 1
            else:
                c = rng.integers(2, SIZE - 3)
                lab[:, c:c + 2] = 1
    images = 40 + 160 * labels + rng.normal(0, 12, labels.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def data():
    return separable_pairs(24, 0), separable_pairs(8, 1), separable_pairs(8, 2)


def test_learns_far_above_a_blank_prediction(data):
    (tx, ty), (vx, vy), (ex, ey) = data
    net = train_segmenter(tx, ty, image_size=SIZE, steps=150, seed=0, device="cpu", val_images=vx, val_labels=vy)
    blank = float(np.mean(batch_dice(np.zeros_like(ey), ey)))
    scores = evaluate_segmenter(net, ex, ey)
    assert blank == 0.0
    assert scores["dice"] > 0.85, scores
    assert scores["n"] == len(ex) and 0 <= scores["cldice"] <= 1


def test_same_seed_same_weights_other_seed_other_weights_on_cpu(data):
    (tx, ty), (vx, vy), _ = data
    kw = dict(image_size=SIZE, steps=20, device="cpu", val_images=vx, val_labels=vy, val_every=5)
    a, b, c = (fit_segmenter(tx, ty, seed=s, **kw) for s in (3, 3, 4))
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k
    assert a.history == b.history
    assert any(not torch.equal(v, c.net.state_dict()[k]) for k, v in a.net.state_dict().items())


def test_threshold_and_weights_are_chosen_on_validation(data):
    (tx, ty), (vx, vy), (ex, ey) = data
    fit = fit_segmenter(tx, ty, image_size=SIZE, steps=40, seed=0, device="cpu", val_images=vx, val_labels=vy,
                        val_every=10)
    best_row = max(fit.history, key=lambda r: r["val_dice"])
    assert (fit.best_step, fit.best_val_dice, fit.threshold) == (best_row["step"], best_row["val_dice"],
                                                                  best_row["threshold"])
    # The kept weights are the best-on-val ones and the stored threshold is the best for them on val.
    thr, dice = choose_threshold(predict_probabilities(fit.net, vx), vy)
    assert thr == pytest.approx(fit.threshold) and dice == pytest.approx(fit.best_val_dice)
    assert float(fit.net.label_threshold) == pytest.approx(fit.threshold)
    # evaluate_segmenter labels with the stored threshold unless told otherwise.
    assert evaluate_segmenter(fit.net, ex, ey) == evaluate_segmenter(fit.net, ex, ey, threshold=fit.threshold)
    no_val = fit_segmenter(tx, ty, image_size=SIZE, steps=5, seed=0, device="cpu")
    assert no_val.threshold == 0.5 and no_val.history == []


def test_choose_threshold_picks_the_separating_grid_value():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 2:4] = 1
    probs = np.where(labels == 1, 0.3, 0.1).astype(np.float32)
    thr, dice = choose_threshold(probs, labels)
    assert 0.1 <= thr < 0.3 and dice == 1.0


def test_the_step_budget_is_respected(data, monkeypatch):
    (tx, ty), (vx, vy), _ = data
    calls = []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    fit = fit_segmenter(tx, ty, image_size=SIZE, steps=37, seed=0, device="cpu", val_images=vx, val_labels=vy,
                        val_every=10)
    assert len(calls) == 37 == fit.steps
    assert [r["step"] for r in fit.history] == [10, 20, 30, 37]


def test_unet_option_trains_for_the_usefulness_experiment(data):
    (tx, ty), _, (ex, ey) = data
    net = train_segmenter(tx, ty, image_size=SIZE, steps=3, seed=0, device="cpu", arch="unet", width=4)
    assert isinstance(net, VesselSegmenter) and net.arch == "unet"
    probs = predict_probabilities(net, ex)
    assert probs.shape == ex.shape and probs.min() >= 0 and probs.max() <= 1
    assert set(evaluate_segmenter(net, ex, ey)) >= {"dice", "iou", "cldice", "n"}


def test_bad_input_is_refused_with_a_clear_error(data):
    (tx, ty), _, _ = data
    with pytest.raises(ValueError, match="steps"):
        fit_segmenter(tx, ty, image_size=SIZE, steps=0)
    with pytest.raises(ValueError, match="shape"):
        fit_segmenter(tx, ty[:-1], image_size=SIZE, steps=1)
    with pytest.raises(ValueError, match="arch"):
        VesselSegmenter("resnet")


def test_loss_is_lowest_for_the_right_mask_and_the_dice_term_does_not_favour_empty_masks():
    """The objective ranks predictions as a user expects: the annotation beats an empty and a full mask."""

    class Fixed(torch.nn.Module):  # logits that give the probabilities we want to score
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    y = torch.zeros(2, 1, 16, 16)
    y[:, :, 4:6, :] = 1.0  # a horizontal vessel
    net = VesselSegmenter("dilated")
    losses = {}
    for name, mask in (("right", y), ("empty", torch.zeros_like(y)), ("full", torch.ones_like(y))):
        net.net = Fixed((mask * 2 - 1) * 8.0)  # confident logits
        losses[name] = float(net.loss(torch.zeros_like(y), y))
    assert losses["right"] < 0.05 < losses["empty"] and losses["right"] < losses["full"]
    from brvo_models.losses import soft_dice_loss
    assert float(soft_dice_loss(torch.zeros_like(y), y)) > 0.9 > 0.05 > float(soft_dice_loss(y, y))
