"""brvo_models.metrics on hand-computed cases; SSIM and PSNR against skimage directly."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from brvo_models import metrics as M


def test_mse_hand_computed():
    assert M.mse(np.array([0.0, 1.0, 0.5, 0.5]), np.array([1.0, 1.0, 0.0, 0.5])) == pytest.approx((1 + 0.25) / 4)


def test_psnr_hand_computed_and_identical_cap():
    a = np.zeros((8, 8))
    b = np.full((8, 8), 0.1)  # mse 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert M.psnr(a, b) == pytest.approx(20.0)
    assert M.psnr(a, b * 255, data_range=255.0) == pytest.approx(20.0)
    assert M.psnr(a, a) == 100.0  # skimage gives inf; capped so means stay finite


def test_psnr_matches_skimage():
    rng = np.random.default_rng(0)
    a, b = rng.random((32, 32)), rng.random((32, 32))
    assert M.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))


@pytest.mark.parametrize("data_range,scale", [(1.0, 1.0), (255.0, 255.0)])
def test_ssim_matches_skimage_gaussian_sigma_1_5(data_range, scale):
    rng = np.random.default_rng(1)
    a = rng.random((48, 48)) * scale
    b = np.clip(a + rng.normal(0, 0.1 * scale, a.shape), 0, scale)
    want = structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert M.ssim(a, b, data_range=data_range) == pytest.approx(want, abs=1e-12)
    # the uniform-window default of skimage gives a different number: the settings matter
    assert M.ssim(a, b, data_range=data_range) != pytest.approx(structural_similarity(a, b, data_range=data_range))


def test_ssim_identical_is_one_and_inverted_is_low():
    a = np.random.default_rng(2).random((32, 32))
    assert M.ssim(a, a) == pytest.approx(1.0)
    assert M.ssim(a, 1.0 - a) < 0.0


def test_cosine_hand_computed():
    assert M.cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert M.cosine(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert M.cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert M.cosine(np.zeros(4), np.ones(4)) == 0.0


def _masks():
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :2] = 1  # 2 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[0, :] = 1  # 4 pixels, 2 overlap
    return pred, truth


def test_dice_and_iou_hand_computed():
    pred, truth = _masks()
    assert M.dice(pred, truth) == pytest.approx(2 * 2 / (4 + 2))
    assert M.iou(pred, truth) == pytest.approx(2 / 4)
    empty = np.zeros((4, 4), np.uint8)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(pred, empty) == 0.0 and M.iou(pred, empty) == 0.0


def test_cldice_half_a_vessel_found():
    truth = np.zeros((9, 16), np.uint8)
    truth[4, 2:12] = 1  # one 1-px vessel, 10 px long
    pred = np.zeros_like(truth)
    pred[4, 2:7] = 1  # its first half
    # Tprec = |S(P) & T| / |S(P)| = 1, Tsens = |S(T) & P| / |S(T)| = 5/10
    assert M.cldice(pred, truth) == pytest.approx(2 * 1.0 * 0.5 / 1.5, abs=1e-6)
    assert M.cldice(truth, truth) == pytest.approx(1.0, abs=1e-6)


def test_cldice_rewards_topology_where_dice_does_not():
    truth = np.zeros((9, 16), np.uint8)
    truth[4, 2:12] = 1
    thick = np.zeros_like(truth)
    thick[3:6, 1:13] = 1  # a 3-px wide vessel around the thin one: skeleton lies on it, covers it
    assert M.dice(thick, truth) == pytest.approx(2 * 10 / (36 + 10))
    # skeleton of the band lies (almost) on the thin vessel and the band covers all of it
    assert M.cldice(thick, truth) >= 0.85
    assert M.cldice(thick, truth) > M.dice(thick, truth) + 0.3
    broken = truth.copy()
    broken[4, 6:8] = 0  # a gap: topology broken
    assert M.cldice(broken, truth) < 1.0


def test_label_and_image_scores_keys_and_mean():
    pred, truth = _masks()
    assert set(M.label_scores(pred, truth)) == {"dice", "iou", "cldice"}
    big = np.kron(pred, np.ones((4, 4))), np.kron(truth, np.ones((4, 4)))  # SSIM's window needs >= 11 px
    assert set(M.image_scores(*big)) == {"mse", "psnr", "ssim", "cosine"}
    rows = [{"dice": 0.5, "iou": 0.25}, {"dice": 1.0, "iou": 0.75}]
    assert M.mean_scores(rows) == {"dice": 0.75, "iou": 0.5, "n": 2}
    assert M.mean_scores([]) == {"n": 0}
