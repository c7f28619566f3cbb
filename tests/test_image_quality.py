"""brvo_models.image_quality: exact arithmetic against brute force, then sanity on phantom images.

The sanity rules were fixed before the numbers were looked at:
- two random halves of the same real images: |KID mean| <= 2 * KID std over subsets;
- reference = real images of half the patients; compared with the other patients' real images,
  those images blurred (Gaussian, sigma 1 px) and those images heavily corrupted (noise sd 60 and
  six random flat 8x8 blocks): blurred KID exceeds real KID by more than twice the larger of the
  two stds, and precision, density and coverage are strictly lower for blurred than for real;
  corrupted has the highest KID and precision, density, coverage no higher than blurred.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from brvo_models import image_quality as IQ



# ---------------------------------------------------------------- exact arithmetic


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020 by the definitions, with plain loops."""
    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - q) for j, q in enumerate(points) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    d = [[np.linalg.norm(x - y) for y in fake] for x in real]
    precision = np.mean([any(d[i][j] < r_real[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[i][j] < r_fake[j] for j in range(len(fake))) for i in range(len(real))])
    density = np.mean([sum(d[i][j] < r_real[i] for i in range(len(real))) for j in range(len(fake))]) / k
    coverage = np.mean([min(d[i]) < r_real[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equals_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(0, 1, (40, 6))
    fake = rng.normal(0.4, 1.3, (31, 6))
    got = IQ.prdc(torch.as_tensor(real), torch.as_tensor(fake), nearest_k=k)
    want = brute_force_prdc(real, fake, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1  # a case that exercises both sides


def test_prdc_identical_and_far_apart_sets():
    x = torch.as_tensor(np.random.default_rng(0).normal(0, 1, (30, 5)))
    assert IQ.prdc(x, x.clone(), nearest_k=5) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})
    assert IQ.prdc(x, x + 100.0, nearest_k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="needs more than 5"):
        IQ.prdc(x[:5], x, nearest_k=5)


def brute_force_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^degree (Binkowski et al. 2018), plain loops."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** degree  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_is_the_mean_and_std_of_unbiased_mmd_over_seeded_subsets():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(0, 1, (20, 4)), rng.normal(0.3, 1, (23, 4))
    state = torch.random.get_rng_state()
    mean, std, m = IQ.kid(torch.as_tensor(real), torch.as_tensor(fake), subsets=3, subset_size=1000, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert m == 10  # capped at half the smaller side
    # the same subsets as torchmetrics draws them: per subset, a permutation of real then of fake
    torch.manual_seed(7)
    values = []
    for _ in range(3):
        pr, pf = torch.randperm(len(real))[:m].numpy(), torch.randperm(len(fake))[:m].numpy()
        values.append(brute_force_mmd2(real[pr], fake[pf]))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    again = IQ.kid(torch.as_tensor(real), torch.as_tensor(fake), subsets=3, subset_size=1000, seed=7)
    assert again == (mean, std, m)


# ---------------------------------------------------------------- extractors


def test_random_cnn_is_fixed_by_its_seed_and_independent_of_batching():
    imgs = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    a, b, c = IQ.RandomCNNFeatures(0), IQ.RandomCNNFeatures(0), IQ.RandomCNNFeatures(1)
    fa = IQ.extract_features(a, imgs)
    assert fa.shape == (6, a.dim) == (6, 480) and fa.dtype == torch.float64
    assert torch.equal(fa, IQ.extract_features(b, imgs))
    assert not torch.allclose(fa, IQ.extract_features(c, imgs))
    assert torch.allclose(fa, IQ.extract_features(a, imgs, batch_size=4))
    assert torch.allclose(fa, a(torch.as_tensor(imgs)[:, None]))  # (N, 1, H, W) tensors too
    with pytest.raises(ValueError, match="grey images"):
        a(np.zeros((2, 3, 16, 16), np.uint8))


def _unet(seed: int = 0):
    from brvo_models.pix2pix import UnetGenerator, init_weights

    torch.manual_seed(seed)
    return init_weights(UnetGenerator(input_nc=1, output_nc=1, num_downs=6, ngf=8))


def test_encoder_features_reads_named_layers_and_refuses_unknown_ones():
    net = _unet()
    layers = IQ.unet_encoder_layers(net)
    assert len(layers) == 6 and all(type(dict(net.named_modules())[n]) is torch.nn.Conv2d for n in layers)
    with pytest.raises(ValueError, match="not found"):
        IQ.EncoderFeatures(net, ["no.such.layer"])
    ex = IQ.unet_encoder_features(net)
    assert ex.layers == layers[:4]
    imgs = np.random.default_rng(1).integers(0, 256, (6, 64, 64), dtype=np.uint8)
    ex.train()  # stays in eval mode: BatchNorm must not use batch statistics
    f = IQ.extract_features(ex, imgs)
    assert f.shape == (6, 2 * 8 * (1 + 2 + 4 + 8))
    assert torch.allclose(f, IQ.extract_features(ex, imgs, batch_size=2))
    ex.calibrate(imgs)
    assert float(IQ.extract_features(ex, imgs).square().mean().sqrt()) == pytest.approx(1.0)


# ---------------------------------------------------------------- sanity on phantom images


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """uint8 images, patient ids and stages of a 12-patient phantom prepared at 64 px (the demo preset)."""
    from storage.paired_format import read_arrays, read_meta
    from tasks.config import preset
    from tasks.ingest import ingest
    from flows.phantom import generate_phantom
    from tasks.preprocess import preprocess

    root = tmp_path_factory.mktemp("iq")
    generate_phantom(root / "SOUL", n_patients=12, seed=0)
    quiet = lambda *a, **k: None  # noqa: E731
    ingest(root / "SOUL", root / "run", log=quiet)
    preprocess(root / "run", preset("demo"), log=quiet)
    meta = read_meta(root / "run" / "soul.h5")
    images, _ = read_arrays(root / "run" / "soul.h5")
    assert images.shape[1:] == (64, 64)
    return images, meta["patient_id"].to_numpy(), meta["stage"].to_numpy()


def blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.stack([np.clip(ndimage.gaussian_filter(i.astype(float), sigma), 0, 255).round() for i in images]
                    ).astype(np.uint8)


def corrupt(images: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = images.astype(float) + rng.normal(0, 60, images.shape)
    h, w = images.shape[1:]
    for img in out:
        for _ in range(6):
            r, c = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[r:r + 8, c:c + 8] = rng.uniform(0, 255)
    return np.clip(out, 0, 255).astype(np.uint8)


EXTRACTORS = ["random_cnn", "unet_encoder"]


def make_extractor(name: str, calibration_images: np.ndarray):
    if name == "random_cnn":
        return IQ.RandomCNNFeatures(seed=0)
    # stands in for the trained Pix2Pix generator: the interface and the sanity ranking, not its weights
    return IQ.unet_encoder_features(_unet()).calibrate(calibration_images)


@pytest.mark.parametrize("name", EXTRACTORS)
def test_sanity_real_beats_blurred_beats_corrupted_and_real_halves_agree(phantom, name):
    images, patients, _ = phantom
    ids = sorted(set(patients))
    ref_rows = np.isin(patients, ids[::2])
    ref, other = images[ref_rows], images[~ref_rows]
    ex = make_extractor(name, ref)
    cfg = IQ.ImageQualityConfig()
    f_all = IQ.extract_features(ex, images)
    f_ref, f_other = f_all[torch.as_tensor(ref_rows)], f_all[torch.as_tensor(~ref_rows)]

    halves = np.random.default_rng(0).permutation(len(images))
    same = IQ.compare_features(f_all[halves[: len(images) // 2]], f_all[halves[len(images) // 2:]], cfg)
    assert abs(same["kid_mean"]) <= 2 * same["kid_std"], same

    real = IQ.compare_features(f_ref, f_other, cfg)
    blurred = IQ.compare_features(f_ref, IQ.extract_features(ex, blur(other)), cfg)
    corrupted = IQ.compare_features(f_ref, IQ.extract_features(ex, corrupt(other)), cfg)
    for r in (real, blurred, corrupted):
        assert r["reason"] is None and r["n_real"] == len(ref) and r["n_synthetic"] == len(other)
    assert blurred["kid_mean"] - real["kid_mean"] > 2 * max(real["kid_std"], blurred["kid_std"]), (real, blurred)
    assert corrupted["kid_mean"] > blurred["kid_mean"]
    for key in ("precision", "density", "coverage"):
        assert real[key] > blurred[key] >= corrupted[key], (key, real, blurred, corrupted)


def test_stage_quality_per_stage_small_n_and_baseline(phantom):
    images, patients, stages = phantom
    ids = sorted(set(patients))
    heldout = np.isin(patients, ids[:6])
    real, real_stages = images[heldout], stages[heldout]
    # "synthetic": the other patients' images blurred, plus a stage with only 3 images and one with none
    syn_rows = ~heldout & (stages != 5)
    synthetic = np.concatenate([blur(images[syn_rows]), images[~heldout & (stages == 5)][:3]])
    syn_stages = np.concatenate([stages[syn_rows], np.full(3, 5)])
    cfg = IQ.ImageQualityConfig(kid_subsets=20)
    state = torch.random.get_rng_state()
    out = IQ.stage_quality(synthetic, syn_stages, real, real_stages, config=cfg,
                           baseline_images=images[~heldout], baseline_stages=stages[~heldout])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert list(out) == ["s1t1", "s1t2", "s2t1", "s2t2", "s3t1", "s3t2", "all"]
    few = out["s3t2"]
    assert few["n_synthetic"] == 3 and all(math.isnan(few[k]) for k in IQ.NUMBERS)
    assert "too few images" in few["reason"] and "3 synthetic" in few["reason"]
    for stage in ("s1t1", "all"):
        row = out[stage]
        assert row["reason"] is None and row["n_real"] == int((real_stages == 0).sum() if stage == "s1t1" else len(real))
        assert all(math.isfinite(row[k]) for k in IQ.NUMBERS)
        # blurred synthetic images against unblurred real images of the same patients: the baseline wins
        assert row["baseline"]["kid_mean"] < row["kid_mean"] and row["baseline"]["precision"] > row["precision"]
    again = IQ.stage_quality(synthetic, syn_stages, real, real_stages, config=cfg)
    assert again["all"]["kid_mean"] == out["all"]["kid_mean"]  # seeded subsets: reproducible
    rows = IQ.as_table(out)
    assert rows[0]["stage"] == "s1t1" and len(rows) == 7


def test_stage_quality_with_nothing_on_one_side_and_bad_lengths():
    imgs = np.random.default_rng(0).integers(0, 256, (12, 32, 32), dtype=np.uint8)
    out = IQ.stage_quality(imgs, np.zeros(12), np.zeros((0, 32, 32), np.uint8), np.zeros(0))
    assert out["s1t1"]["n_real"] == 0 and "too few images" in out["s1t1"]["reason"]
    with pytest.raises(ValueError, match="stages"):
        IQ.stage_quality(imgs, np.zeros(11), imgs, np.zeros(12))


def test_encoder_features_leave_no_hooks_on_the_model():
    net = _unet()
    ex = IQ.unet_encoder_features(net)
    ex(np.zeros((2, 64, 64), np.uint8))
    assert all(not m._forward_hooks for m in net.modules())
