"""brvo_models.batched_metrics against the numpy/skimage reference path (brvo_models.metrics).

Agreement to 1e-4 per image (float64 agrees to ~1e-12; float32 is checked at 1e-4), and the torch
skeleton equals skimage's pixel for pixel. Runs on the CPU, and on CUDA too where one is visible.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import line
from skimage.morphology import skeletonize as sk_skeletonize

from brvo_models import batched_metrics as B
from brvo_models import metrics as M

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = 1e-4


def vessel_masks(n: int, size: int, seed: int) -> np.ndarray:
    """Phantom-like vessel trees: branching 1-3 px lines, some touching the border, as in OCTA labels."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), bool)
    for m in out:
        stack = [(rng.integers(0, size), 0, np.pi / 2 + rng.normal(0, 0.3), 0)]
        while stack:
            x, y, angle, depth = stack.pop()
            length = rng.uniform(0.2, 0.5) * size / (1 + depth)
            x1 = int(np.clip(x + length * np.cos(angle), 0, size - 1))
            y1 = int(np.clip(y + length * np.sin(angle), 0, size - 1))
            rr, cc = line(int(y), int(x), y1, x1)
            m[rr, cc] = True
            if depth < 4:
                for turn in (-0.6, 0.6):
                    stack.append((x1, y1, angle + turn + rng.normal(0, 0.2), depth + 1))
        thick = ndimage.binary_dilation(m, iterations=1) & (rng.random(m.shape) < 0.7)
        m |= thick if rng.random() < 0.5 else ndimage.binary_dilation(m)  # 1-3 px, ragged or clean
    return out


def vessel_images(masks: np.ndarray, seed: int) -> np.ndarray:
    """OCTA-like images of those vessels in [0, 1]: blurred vessels on a noisy capillary background."""
    rng = np.random.default_rng(seed)
    img = np.stack([ndimage.gaussian_filter(m.astype(float), 0.8) for m in masks])
    img = 0.15 + 0.7 * img + 0.08 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1)


@pytest.fixture(scope="module")
def image_pairs() -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(0)
    rand_a = rng.random((6, 48, 48))
    rand_b = np.clip(rand_a + rng.normal(0, 0.1, rand_a.shape), 0, 1)
    vessels = vessel_images(vessel_masks(6, 64, 1), 2)
    regenerated = np.clip(vessels + rng.normal(0, 0.05, vessels.shape), 0, 1)
    flat = np.stack([np.zeros((32, 40)), np.ones((32, 40)), np.full((32, 40), 0.5)])
    return {
        "random": (rand_a, rand_b, 1.0),
        "random_255": (rand_a * 255, rand_b * 255, 255.0),
        "vessels": (vessels, regenerated, 1.0),
        "identical": (vessels, vessels.copy(), 1.0),
        "inverted": (vessels, 1.0 - vessels, 1.0),
        "flat_and_zero": (flat, flat[[2, 0, 1]], 1.0),  # cosine 0 where an image is all zeros
    }


@pytest.fixture(scope="module")
def mask_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    truth = vessel_masks(6, 64, 4)
    noisy = truth ^ (rng.random(truth.shape) < 0.03)
    thin_pred = np.stack([sk_skeletonize(t) for t in truth])
    empty = np.zeros((3, 32, 32), bool)
    full = np.ones((3, 32, 32), bool)
    some = vessel_masks(3, 32, 5)
    return {
        "vessels_noisy": (noisy, truth),
        "vessels_thinned": (thin_pred, truth),
        "vessels_dilated": (ndimage.binary_dilation(truth, iterations=2), truth),
        "random_blobs": (rng.random((6, 40, 40)) < 0.5, rng.random((6, 40, 40)) < 0.6),
        "empty_empty": (empty, empty),
        "empty_vs_some": (empty, some),
        "some_vs_empty": (some, empty),
        "all_ones": (full, full),
        "all_ones_vs_some": (full, some),
        "identical": (truth, truth.copy()),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["random", "random_255", "vessels", "identical", "inverted", "flat_and_zero"])
def test_image_metrics_match_numpy_per_image(image_pairs, case, device):
    a, b, data_range = image_pairs[case]
    got = B.image_scores(a, b, data_range, device=device)
    assert all(v.device.type == device and v.shape == (len(a),) for v in got.values())
    for i, (x, y) in enumerate(zip(a, b)):
        want = {"mse": M.mse(x, y), "psnr": M.psnr(x, y, data_range=data_range),
                "ssim": M.ssim(x, y, data_range=data_range), "cosine": M.cosine(x, y)}
        for name, value in want.items():
            assert float(got[name][i]) == pytest.approx(value, abs=TOL), (case, name, i)


def test_image_metrics_edge_values(image_pairs):
    a, b, _ = image_pairs["identical"]
    got = B.image_scores(a, b)
    assert torch.all(got["psnr"] == B.PSNR_CAP_DB) and torch.all(got["mse"] == 0)
    assert torch.allclose(got["ssim"], torch.ones(len(a), dtype=torch.float64))
    flat, other, _ = image_pairs["flat_and_zero"]
    assert B.cosine(flat, other).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)
    inv_a, inv_b, _ = image_pairs["inverted"]
    assert torch.all(B.ssim(inv_a, inv_b) < 0)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_image_metrics_within_tolerance(image_pairs, device):
    """float32 (the fast choice on a GPU) stays within 1e-4 of the float64 reference."""
    for case in ("random", "random_255", "vessels"):
        a, b, data_range = image_pairs[case]
        got = B.image_scores(a, b, data_range, dtype=torch.float32, device=device)
        for i, (x, y) in enumerate(zip(a, b)):
            assert float(got["ssim"][i]) == pytest.approx(M.ssim(x, y, data_range=data_range), abs=TOL)
            assert float(got["psnr"][i]) == pytest.approx(M.psnr(x, y, data_range=data_range), abs=TOL)


def test_ssim_window_is_skimage_11_taps_and_small_images_refused():
    assert B.SSIM_WIN_SIZE == 11
    with pytest.raises(ValueError, match="at least 11x11"):
        B.ssim(np.zeros((2, 10, 20)), np.zeros((2, 10, 20)))
    with pytest.raises(ValueError, match="shapes differ"):
        B.mse(np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        B.mse(np.zeros((2, 1, 16, 16)), np.zeros((2, 1, 16, 16)))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["vessels_noisy", "vessels_thinned", "vessels_dilated", "random_blobs",
                                  "empty_empty", "empty_vs_some", "some_vs_empty", "all_ones",
                                  "all_ones_vs_some", "identical"])
def test_label_metrics_match_numpy_per_image(mask_pairs, case, device, backend):
    pred, truth = mask_pairs[case]
    got = B.label_scores(pred, truth, device=device, skeleton_backend=backend)
    for i, (p, t) in enumerate(zip(pred, truth)):
        for name, value in M.label_scores(p, t).items():
            assert float(got[name][i]) == pytest.approx(value, abs=TOL), (case, name, i)


def test_label_metric_conventions(mask_pairs):
    empty, _ = mask_pairs["empty_empty"]
    _, some = mask_pairs["empty_vs_some"]
    for fn in (B.dice, B.iou, B.cldice):
        assert fn(empty, empty).tolist() == [1.0] * len(empty)  # two empty masks agree
        assert fn(empty, some).tolist() == [0.0] * len(empty)


def _all_neighbourhoods() -> np.ndarray:
    """Every 3x3 pattern (centre included) in the middle of a 5x5 image: 512 masks."""
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (0, 0)]
    out = np.zeros((512, 5, 5), bool)
    for code in range(512):
        for bit, (dr, dc) in enumerate(offsets):
            out[code, 2 + dr, 2 + dc] = (code >> bit) & 1
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_skeleton_equals_skimage_pixel_for_pixel(mask_pairs, device):
    rng = np.random.default_rng(7)
    fixtures = {
        "all 3x3 neighbourhoods": _all_neighbourhoods(),
        "random dense blobs": rng.random((64, 24, 24)) < 0.6,
        "smooth blobs touching the border": np.stack([ndimage.gaussian_filter(rng.random((48, 48)), 3) > 0.5
                                                      for _ in range(8)]),
        **{name: np.concatenate(pair) for name, pair in mask_pairs.items()},
        "vessels 256 px": vessel_masks(2, 256, 11),
    }
    for name, masks in fixtures.items():
        got = B.skeletonize(torch.as_tensor(masks, device=device), backend="torch").cpu().numpy()
        want = np.stack([sk_skeletonize(m) for m in masks])
        assert got.dtype == bool and got.shape == masks.shape
        mismatched = int((got != want).sum())
        assert mismatched == 0, f"{name}: {mismatched} pixels differ from skimage"


def test_skeleton_of_a_thick_bar_is_thin_and_not_empty():
    bar = np.zeros((1, 15, 30), bool)
    bar[0, 4:11, 3:27] = True
    for backend in ("auto", "torch", "skimage"):
        skel = B.skeletonize(bar, backend=backend)[0].numpy()
        assert skel.sum() >= 15 and skel.sum(axis=0).max() == 1  # one pixel tall along the bar
    with pytest.raises(ValueError, match="backend"):
        B.skeletonize(bar, backend="fast")
    assert B.skeletonize(np.zeros((0, 8, 8), bool)).shape == (0, 8, 8)


def test_aggregation_equals_mean_scores_of_numpy_rows(image_pairs, mask_pairs):
    a, b, _ = image_pairs["vessels"]
    pred, truth = mask_pairs["vessels_noisy"]
    numpy_rows = [{**M.image_scores(x, y), **M.label_scores(p, t)} for x, y, p, t in zip(a, b, pred, truth)]
    batch = {**B.image_scores(a, b), **B.label_scores(pred, truth)}
    got_rows = B.rows(batch)
    assert len(got_rows) == len(numpy_rows)
    for g, w in zip(got_rows, numpy_rows):
        assert set(g) == set(w) and all(g[k] == pytest.approx(w[k], abs=TOL) for k in w)
    mean, want = B.mean_batch_scores(batch), M.mean_scores(numpy_rows)
    assert mean["n"] == want["n"] == len(a)
    assert set(mean) == set(want) and all(mean[k] == pytest.approx(want[k], abs=TOL) for k in want)
    assert B.mean_batch_scores({"dice": torch.zeros(0)}) == {"n": 0} == M.mean_scores([])


def test_tensors_stay_on_their_device_and_numpy_goes_where_asked():
    a = torch.rand(2, 16, 16)
    assert B.mse(a, a).device == a.device
    assert B.dice(np.ones((2, 8, 8)), np.ones((2, 8, 8)), device="cpu").dtype == torch.float64
    assert B.as_batch(np.zeros((8, 8))).shape == (1, 8, 8)
