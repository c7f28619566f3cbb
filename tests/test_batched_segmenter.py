"""Seeds trained as one grouped net give each seed the fit it gets alone (within float rounding)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brvo_models.segmenter import SeedGroupedNet, VesselSegmenter, fit_segmenter, fit_segmenter_seeds

SIZE = 32


def vessel_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Straight 2 px 'vessels', bright on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, SIZE, SIZE), np.uint8)
    for lab in labels:
        for _ in range(3):
            at = rng.integers(2, SIZE - 3)
            if rng.random() < 0.5:
                lab[at:at + 2, :] = 1
            else:
                lab[:, at:at + 2] = 1
    images = 40 + 120 * labels + rng.normal(0, 30, labels.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def assert_same_fit(alone, batched, atol=2e-5):
    assert batched.best_step == alone.best_step
    assert batched.threshold == alone.threshold
    assert batched.best_val_dice == pytest.approx(alone.best_val_dice, abs=1e-6)
    assert [r["step"] for r in batched.history] == [r["step"] for r in alone.history]
    for a, b in zip(alone.history, batched.history):
        assert b["threshold"] == a["threshold"] and b["val_dice"] == pytest.approx(a["val_dice"], abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    state_a, state_b = alone.net.state_dict(), batched.net.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("arch", ["dilated_bn", "dilated"])
def test_each_seed_gets_the_fit_it_gets_alone(arch):
    """Different rows, weights and seeds per member; batch norm's running stats included (dilated_bn).

    The tolerance is float rounding: weights agree to about 1e-7 here. (Some seeds make a run chaotic: one
    Adam element with a near-zero gradient turns rounding into a 1e-3 difference by step 24, and the same
    happens between two one-by-one runs on 1 and 2 threads; these seeds are not such a case on either.)"""
    train = [vessel_pairs(n, s) for n, s in ((20, 0), (14, 1), (24, 2))]
    weights = [None, np.linspace(0.5, 2.0, 14), None]
    val_x, val_y = vessel_pairs(6, 9)
    seeds = [0, 3, 4]
    options = dict(image_size=SIZE, steps=24, val_images=val_x, val_labels=val_y, val_every=8, arch=arch,
                   width=8, batch_size=4, lr=3e-3, device="cpu", crop=16)
    batched = fit_segmenter_seeds([x for x, _ in train], [y for _, y in train], seeds=seeds, row_weights=weights,
                                  **options)
    assert len(batched) == 3
    for (x, y), w, seed, fit in zip(train, weights, seeds, batched):
        assert_same_fit(fit_segmenter(x, y, seed=seed, row_weights=w, **options), fit)
    # the seeds really differ (a grouping that mixed or shared them would not)
    assert not torch.equal(batched[0].net.net.body[0].weight, batched[1].net.net.body[0].weight)


def test_grouped_forward_is_each_nets_forward():
    torch.manual_seed(0)
    nets = [VesselSegmenter("dilated_bn", SIZE, 4) for _ in range(3)]
    for net in nets:  # distinct running stats, so eval mode is checked too
        net.train()(torch.randn(2, 1, SIZE, SIZE))
    grouped = SeedGroupedNet(nets)
    x = torch.randn(2, 3, SIZE, SIZE)
    for mode in (False, True):
        grouped.train(mode)
        [net.train(mode) for net in nets]
        out = grouped(x)
        for i, net in enumerate(nets):
            torch.testing.assert_close(out[:, i:i + 1], net.net(x[:, i:i + 1]), atol=1e-5, rtol=1e-5)
    for i, net in enumerate(nets):
        for k, v in grouped.seed_state(i).items():
            torch.testing.assert_close(v, net.state_dict()[k], msg=k)


def test_mismatched_inputs_fail_in_one_line():
    x, y = vessel_pairs(4, 0)
    with pytest.raises(ValueError, match="one images, labels"):
        fit_segmenter_seeds([x, x], [y], seeds=[0, 1], image_size=SIZE, steps=2, device="cpu")


def _rows(n: int, seed: int, synthetic: bool = False):
    from tasks.analyses.usefulness_protocol import Rows

    x, y = vessel_pairs(n, seed)
    return Rows(x, y, np.array([f"p{seed}_{i % 3}" for i in range(n)]), np.zeros(n, np.int64),
                np.full(n, synthetic), np.ones(n, bool))


def test_protocol_seeds_batched_score_as_one_by_one():
    """The usefulness protocol's batched sibling: per-seed scores as run_segmentation's; an empty arm is NaN."""
    from brvo_models.configs import SegmenterRecipe, UsefulnessConfig
    from tasks.analyses.usefulness_protocol import Rows, run_segmentation, run_segmentation_seeds

    config = UsefulnessConfig(synthetic_weight=0.5, segmenter=SegmenterRecipe(steps=12, validations=2, width=8,
                                                                              batch_size=4, crop=16))
    trains = [Rows.concat(_rows(12, 0), _rows(6, 1, synthetic=True)), _rows(0, 2), _rows(14, 3)]
    val, evaluate = _rows(6, 8), _rows(6, 9)
    seeds = [0, 1, 2]
    batched = run_segmentation_seeds(trains, val, evaluate, config, seeds, device="cpu")
    assert np.isnan(batched[1]["dice"])
    for i in (0, 2):
        alone = run_segmentation(trains[i], val, evaluate, config, seeds[i], device="cpu")
        assert batched[i].keys() == alone.keys()
        for k in alone:
            assert batched[i][k] == pytest.approx(alone[k], abs=1e-5), (i, k)


def test_the_protocol_trains_an_arms_seeds_together(monkeypatch):
    """run_protocol fits an arm's segmenters in one grouped fit, never seed by seed."""
    import brvo_models.segmenter as segmenter
    from brvo_models.configs import SegmenterRecipe, UsefulnessConfig
    from tasks.analyses.usefulness_protocol import StudyData, run_protocol

    grouped_fit, calls = segmenter.fit_segmenter_seeds, []

    def recording(*args, **kwargs):
        calls.append(list(kwargs["seeds"]))
        return grouped_fit(*args, **kwargs)

    monkeypatch.setattr(segmenter, "fit_segmenter", lambda *a, **k: pytest.fail("a seed was trained alone"))
    monkeypatch.setattr(segmenter, "fit_segmenter_seeds", recording)
    config = UsefulnessConfig(seeds=2, arms=("real_only",), low_data_fractions=(), tasks=("segmentation",),
                              segmenter=SegmenterRecipe(steps=4, validations=1, width=4, batch_size=4, crop=16))
    data = StudyData(real={"train": _rows(10, 0), "val": _rows(4, 1), "test": _rows(4, 2)},
                     synthetic_train=_rows(0, 3, synthetic=True))
    result = run_protocol(data, config, log=lambda _m: None, device="cpu")
    assert calls == [[0, 1]]
    assert len(result["arms"]["real_only"]["tasks"]["segmentation"]["dice"]["per_seed"]) == 2
