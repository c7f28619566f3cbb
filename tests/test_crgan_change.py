"""CRGAN options that aim the generator at the course of the disease: each does what its config field says."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brvo_models.crgan import CRGAN, change_weight_map, course_error, nearest_visible
from brvo_models.crgan_data import PatientSequence, hidden_stages, make_train_batches, texture_amplitudes
from tasks.config import preset
from tasks.crgan import load_sequences

TINY = preset("tiny")
SIZE = TINY.image_size


def _is_suffix(hide: np.ndarray) -> bool:
    first = int(np.argmax(hide)) if hide.any() else len(hide)
    return bool(hide[first:].all() and not hide[:first].any())


def test_suffix_hiding_hides_only_suffixes_keeps_the_first_stage_and_uses_every_cut():
    cfg = TINY.crgan.model_copy(update={"hide_suffix_prob": 1.0})
    rng = np.random.default_rng(0)
    for n in range(2, 7):
        cuts = set()
        for _ in range(200):
            hide = hidden_stages(n, cfg, rng)
            assert _is_suffix(hide) and hide.any() and not hide[0]
            cuts.add(int(np.argmax(hide)))
        assert cuts == set(range(1, n))  # every visible prefix length 1..n-1 occurs
    assert not hidden_stages(1, cfg, rng).any()


def test_without_suffix_hiding_the_stages_are_hidden_independently():
    cfg = TINY.crgan.model_copy(update={"hide_prob": 0.5})
    rng = np.random.default_rng(0)
    draws = [hidden_stages(5, cfg, rng) for _ in range(300)]
    assert all((~h).any() for h in draws)
    assert any(not _is_suffix(h) for h in draws)  # e.g. a hidden stage before a visible one


def test_training_batches_with_suffix_hiding_hide_the_stages_after_a_cut(blob_h5):
    seqs = [s for s in load_sequences(blob_h5) if s.split == "train"]
    cfg = TINY.crgan.model_copy(update={"hide_suffix_prob": 1.0})
    n_hidden = 0
    for batch in make_train_batches(seqs, cfg, seed=0, epoch=0):
        for b in range(len(batch["patient"])):
            rows = np.flatnonzero(batch["sel_b"] == b)
            hide = batch["hidden"][rows][np.argsort(batch["sel_t"][rows])]
            assert _is_suffix(hide) and not hide[0]
            n_hidden += int(hide.sum())
    assert n_hidden > 0


def test_nearest_visible_prefers_the_stage_itself_then_the_earlier_of_a_tie():
    visible = torch.tensor([[True, False, False, True, False, True]])
    sel_t = torch.tensor([0, 1, 2, 3, 4, 5])
    got = nearest_visible(visible, torch.zeros(6, dtype=torch.long), sel_t)
    assert got.tolist() == [0, 0, 3, 3, 3, 5]  # stage 4: 3 and 5 tie, the earlier wins


def _change_inputs(change: torch.Tensor):
    """One sequence: stage 0 visible (a flat image), stage 2 hidden with target = stage 0 + change."""
    size = change.shape[-1]
    base = torch.full((1, 1, size, size), -0.2)
    context = torch.zeros(1, 6, 1, size, size)
    context[0, 0] = base[0]
    visible = torch.tensor([[True, False, False, False, False, False]])
    return base + change, context, visible, torch.tensor([0]), torch.tensor([2])


def test_change_weight_is_one_where_nothing_changed_and_highest_where_the_stage_changed():
    same = change_weight_map(*_change_inputs(torch.zeros(1, 1, SIZE, SIZE)), weight=4.0)
    assert torch.equal(same, torch.ones_like(same))
    change = torch.zeros(1, 1, SIZE, SIZE)
    change[..., 8:16, 8:16] = -0.6  # a region lost its flow signal
    w = change_weight_map(*_change_inputs(change), weight=4.0)
    assert float(w.max()) == pytest.approx(5.0, abs=1e-5)
    assert float(w[..., 10:14, 10:14].min()) > 4.0  # inside the changed region
    assert float(w[..., 24:, 24:].max()) == pytest.approx(1.0, abs=1e-3)  # far from it


def test_change_weight_marks_the_changed_region_not_the_speckle():
    size = 64
    g = torch.Generator().manual_seed(0)
    change = 0.06 * torch.randn(1, 1, size, size, generator=g)  # speckle, 3 % of the intensity range
    change[..., 16:32, 16:32] -= 0.6  # and a region that lost its flow signal
    w = change_weight_map(*_change_inputs(change), weight=4.0)
    assert float(w[..., 20:28, 20:28].mean()) > 4.0
    assert float(w[..., 44:, 44:].mean()) < 1.3  # speckle alone, far from the region
    small = change_weight_map(*_change_inputs(0.02 * torch.randn(1, 1, size, size, generator=g)), weight=4.0)
    assert float(small.max()) < 2.0  # two stages that differ by speckle only: below the floor, no full weight


def test_the_change_weighted_loss_differs_from_plain_l1_and_stays_finite(blob_h5):
    seqs = [s for s in load_sequences(blob_h5) if s.split == "train"]
    torch.manual_seed(0)
    plain_cfg = TINY.crgan.model_copy(update={"hide_prob": 0.6})
    batch = make_train_batches(seqs, plain_cfg, seed=0, epoch=0)[0]
    plain = CRGAN(plain_cfg, SIZE, [s.patient_id for s in seqs])
    weighted = CRGAN(plain_cfg.model_copy(update={"change_weight": 8.0}), SIZE, [s.patient_id for s in seqs])
    weighted.generator.load_state_dict(plain.generator.state_dict())
    with torch.no_grad():
        a, b = plain.losses(batch), weighted.losses(batch)
    assert torch.isfinite(b["loss_g"])
    assert float(a["l1_hidden"]) != pytest.approx(float(b["l1_hidden"]), rel=1e-4)


def _noisy_sequences(speckle: float, lines: float, n_patients: int = 6, size: int = 64):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    seqs = []
    for p in range(n_patients):
        images: list[np.ndarray | None] = [None] * 6
        for stage in range(6):
            mean = 0.3 + 0.3 * np.sin(6 * xx + p) ** 2 + 0.05 * stage * yy
            n = 1 + (stage + p) % 3
            white = rng.standard_normal((n, size, size))
            rows = rng.standard_normal((n, size, 1))
            scans = mean + speckle * mean * white + lines * rows
            images[stage] = np.clip(np.round(scans * 255), 0, 255).astype(np.uint8)
        seqs.append(PatientSequence(str(p), "train", images, index=p))
    return seqs


def test_moment_matched_amplitudes_equal_the_spread_of_repeat_scans():
    speckle, lines = texture_amplitudes(_noisy_sequences(0.2, 0.03))
    assert speckle == pytest.approx(0.2, rel=0.05)
    assert lines == pytest.approx(0.03, rel=0.15)
    one_scan_each = [PatientSequence("x", "train", [np.zeros((1, 8, 8), np.uint8)] + [None] * 5)]
    with pytest.raises(ValueError, match="two or more scans"):
        texture_amplitudes(one_scan_each)


def test_moment_fitted_texture_is_fixed_and_never_trained(blob_h5):
    seqs = [s for s in load_sequences(blob_h5) if s.split == "train"]
    cfg = TINY.crgan.model_copy(update={"texture_fit": "moments"})
    with pytest.raises(ValueError, match="texture_amplitudes"):
        CRGAN(cfg, SIZE, [s.patient_id for s in seqs])
    model = CRGAN(cfg, SIZE, [s.patient_id for s in seqs], texture_amplitudes=(0.15, 0.02))
    amp = model.generator.texture["log_amp"]
    assert torch.allclose(amp.exp(), torch.tensor([0.15, 0.02]))
    assert all(amp is not p for group in model.opt_g.param_groups for p in group["params"])
    model.train_step(make_train_batches(seqs, cfg, seed=0, epoch=0)[0])
    assert torch.allclose(model.generator.texture["log_amp"].exp(), torch.tensor([0.15, 0.02]))
    learned = CRGAN(TINY.crgan, SIZE, [s.patient_id for s in seqs])
    assert any(learned.generator.texture["log_amp"] is p for g in learned.opt_g.param_groups for p in g["params"])


def _course_case():
    """Stage 1 has a dark square that stage 3 lacks: the non-perfusion index falls between them."""
    size = 64
    bright = np.full((2, size, size), 200, np.uint8)
    dark = bright.copy()
    dark[:, 10:40, 10:40] = 30
    seq = PatientSequence("p", "val", [None, dark, None, bright, None, None])
    return seq, dark, bright


def test_course_error_is_zero_for_the_true_stage_and_the_whole_change_for_a_copy():
    seq, dark, bright = _course_case()
    exact = course_error([(seq, 3)], [bright[0] / 255.0])
    copy = course_error([(seq, 3)], [dark[0] / 255.0])
    assert exact == pytest.approx(0.0, abs=1e-9)
    assert copy > 10.0  # pp: the square is a fifth of the image
    assert course_error([(seq, 1)], [dark[0] / 255.0]) is None  # no earlier stage to change from


def test_validation_score_subtracts_the_course_error_only_when_asked(blob_h5):
    seqs = load_sequences(blob_h5)
    train = [s for s in seqs if s.split == "train"]
    val = [s for s in seqs if s.split == "val"]
    torch.manual_seed(0)
    plain = CRGAN(TINY.crgan, SIZE, [s.patient_id for s in train], val_seqs=val)
    course = CRGAN(TINY.crgan.model_copy(update={"val_course_weight": 0.01}), SIZE,
                   [s.patient_id for s in train], val_seqs=val)
    course.generator.load_state_dict(plain.generator.state_dict())
    a, b = plain.validate(), course.validate()
    assert a["score"] == a["ssim"] and "course_mae" not in a
    assert b["ssim"] == pytest.approx(a["ssim"])
    assert b["score"] == pytest.approx(b["ssim"] - 0.01 * b["course_mae"])


def test_nearest_residual_base_makes_the_output_a_change_from_the_nearest_visible_stage():
    from brvo_models.crgan import CRGANGenerator
    from brvo_models.crgan_data import pixel_noise

    g = torch.Generator().manual_seed(0)
    context = torch.rand(1, 6, 1, SIZE, SIZE, generator=g) * 1.6 - 0.8
    visible = torch.tensor([[False, True, False, False, True, False]])
    sel_b, sel_t = torch.zeros(4, dtype=torch.long), torch.tensor([0, 2, 3, 5])
    args = (context, visible, torch.tensor([0]), torch.zeros(1, TINY.crgan.z_dim), pixel_noise(4, SIZE, g),
            sel_b, sel_t)
    for base, expect_nearest in (("nearest", True), ("blend", False)):
        gen = CRGANGenerator(TINY.crgan.model_copy(update={"residual_base": base}), SIZE, 2).eval()
        with torch.no_grad():
            gen.head.weight.zero_()
            gen.head.bias.zero_()  # no correction: the output is the base alone
            _, mean = gen(*args, return_mean=True)
        nearest = context[0, [1, 1, 4, 4]]  # stages 0, 2 -> 1; 3, 5 -> 4
        assert torch.allclose(mean, 0.98 * nearest, atol=1e-5) == expect_nearest


def test_the_gain_estimate_starts_as_the_blend_and_can_only_change_it_smoothly():
    from brvo_models.crgan import CRGANGenerator, gain_resolution

    size = 64
    cfg = TINY.crgan.model_copy(update={"estimate_form": "gain", "texture": False})
    torch.manual_seed(0)
    g = CRGANGenerator(cfg, size, 2).eval()
    context = torch.rand(1, 6, 1, size, size) * 1.2 - 0.6  # [0.2, 0.8] on the [0, 1] scale: no clipping
    visible = torch.tensor([[True, False, True, False, False, False]])
    args = (context, visible, torch.tensor([0]), torch.zeros(1, cfg.z_dim), torch.zeros(1, 2, size, size),
            torch.tensor([0]), torch.tensor([4]))
    with torch.no_grad():
        at_init = g(*args)
        nearest = context[0, 2]
        # after the last visit both neighbours are stage 2; the blend mixes them with the pool of 0 and 2
        pool = (context[0, 0] + context[0, 2]) / 2
        lo, hi = torch.minimum(nearest, pool), torch.maximum(nearest, pool)
        assert bool(((at_init[0] >= lo - 1e-5) & (at_init[0] <= hi + 1e-5)).all())  # gain 1: a blend
        torch.nn.init.normal_(g.gain_head.weight, 0, 0.05)
        changed = g(*args)
    ratio = ((changed + 1) / (at_init + 1).clamp_min(1e-3))[0, 0]
    assert float((ratio - 1).abs().mean()) > 0.01  # the gain moved the estimate
    # ... but only at the gain map's resolution: the log ratio is smooth (no pixel-to-pixel jumps beyond
    # what bilinear upsampling of a gain_resolution grid allows)
    step = size // gain_resolution(size)
    log_ratio = ratio.clamp_min(1e-3).log()
    valid = ((changed > -1 + 1e-3) & (changed < 1 - 1e-3))[0, 0]
    jump = (log_ratio[:, 1:] - log_ratio[:, :-1]).abs()[valid[:, 1:] & valid[:, :-1]]
    assert float(jump.max()) < float(log_ratio[valid].abs().max()) * 2 / step + 1e-4
