"""Held-out evaluation on the device (issue 12, item 3): the batched torch path that runs when the run's
device is CUDA, forced here on the CPU through the real evaluate functions, agrees with the numpy path
(the reference) to 1e-4 on every number it reports."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brvo_models.batched_metrics import metrics_device
from conftest import write_blob_dataset
from tasks.config import preset
from tasks.fill import fill_missing
from tasks.label import label_synthetic
from tasks.score import score_samples
from tasks.crgan import evaluate_crgan, train_crgan
from tasks.pix2pix import evaluate_pix2pix, train_pix2pix

CONFIG = preset("tiny").with_overrides(device="cpu", **{"pix2pix.epochs": 2, "crgan.epochs": 2})


def _quiet(_m: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both tiny models trained on blobs, the holes filled and labelled: every evaluation's inputs."""
    run = tmp_path_factory.mktemp("device-metrics") / "run"
    run.mkdir()
    write_blob_dataset(run / "soul.h5", n_patients=10, image_size=CONFIG.image_size)
    p2p = train_pix2pix(run, CONFIG, log=_quiet)
    crgan = train_crgan(run, CONFIG, log=_quiet)
    fill_missing(run, CONFIG, crgan.best_path, log=_quiet)
    label_synthetic(run, CONFIG, p2p.best_path, log=_quiet)
    return run, p2p, crgan


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts calls into the batched path, so a test knows which path computed its numbers."""
    import brvo_models.batched_metrics as bm
    import tasks.score

    calls: list[str] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    for name in ("paired_scores", "mask_image_scores", "dice", "cldice"):
        monkeypatch.setattr(bm, name, spy(name, getattr(bm, name)))
    monkeypatch.setattr(tasks.score, "paired_scores", spy("paired_scores", tasks.score.paired_scores))
    return calls


def _numbers(tree, prefix=""):
    """Every number in a nested report section, by its path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k in ("seconds", "checkpoint"):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}{i}."))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def _agree(numpy_section, batched_section, tol=1e-4) -> int:
    a, b = _numbers(numpy_section), _numbers(batched_section)
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert b[key] == pytest.approx(a[key], abs=tol), key
    return len(a)


def test_the_device_path_is_chosen_for_cuda_runs_only():
    assert metrics_device("cpu") is None and metrics_device(torch.device("cpu")) is None
    assert metrics_device("cuda:1") == torch.device("cuda:1")  # no GPU needed to decide
    assert metrics_device("cuda", None) is None and metrics_device("cpu", "cpu") == torch.device("cpu")


def test_pix2pix_evaluation_agrees(run, batched_calls):
    run_dir, _, _ = run
    reference = evaluate_pix2pix(run_dir, CONFIG, log=_quiet, score_on=None)
    assert batched_calls == []
    batched = evaluate_pix2pix(run_dir, CONFIG, log=_quiet, score_on="cpu")
    # model, Otsu, Frangi, the supervised segmenter, and that segmenter flip-averaged (shown, not a bar)
    assert batched_calls.count("mask_image_scores") == 5
    assert (reference["segmenter_params"]["flip_averaged_test"]
            == pytest.approx(batched["segmenter_params"]["flip_averaged_test"]))
    assert _agree(reference, batched) > 20
    assert reference["test"]["n"] == batched["test"]["n"] > 0


def test_crgan_evaluation_agrees(run, batched_calls):
    run_dir, _, _ = run
    reference = evaluate_crgan(run_dir, CONFIG, log=_quiet, score_on=None)
    assert batched_calls == []
    batched = evaluate_crgan(run_dir, CONFIG, log=_quiet, score_on="cpu")
    assert batched_calls.count("paired_scores") == 3  # case scores, diversity, own/other
    assert _agree(reference, batched) > 50
    assert reference["sample_quality"]["own_vs_other_ssim"]["n_cases"] > 0


def test_scoring_consistency_agrees(run, batched_calls):
    import pandas as pd

    run_dir, p2p, crgan = run
    reference = score_samples(run_dir, CONFIG, crgan.best_path, p2p.best_path, log=_quiet, score_on=None)
    want = pd.read_csv(reference.scores_csv)
    assert batched_calls == []
    batched = score_samples(run_dir, CONFIG, crgan.best_path, p2p.best_path, log=_quiet, score_on="cpu")
    # the synthetic samples, and the held-out real rows the thresholds are calibrated on when there are enough
    assert set(batched_calls) == {"paired_scores"} and len(batched_calls) >= 1
    got = pd.read_csv(batched.scores_csv)
    assert len(got) == len(want) == reference.n > 0
    np.testing.assert_allclose(got["consistency_ssim"], want["consistency_ssim"], atol=1e-4)
    assert not np.array_equal(got["consistency_ssim"], np.zeros(len(got)))
    _agree(reference.summary, batched.summary)
    assert batched.thresholds.source == reference.thresholds.source
    assert batched.thresholds.min_consistency_ssim == pytest.approx(reference.thresholds.min_consistency_ssim,
                                                                    abs=1e-4)


def test_validation_scores_agree(run, batched_calls):
    """What fit validates on every epoch: the same numbers (Pix2Pix's Dice and threshold exactly)."""
    from brvo_models.crgan import CRGAN
    from brvo_models.pix2pix import Pix2Pix, load_labeller
    from tasks.crgan import load_sequences
    from tasks.pix2pix import load_split

    run_dir, p2p, crgan = run
    val_x, val_y, _ = load_split(run_dir / "soul.h5", ("val",))
    generator, _ = load_labeller(p2p.best_path, "cpu")
    results = []
    for score_on in (None, "cpu"):
        model = Pix2Pix(CONFIG.pix2pix, CONFIG.image_size, "cpu", val_x, val_y, score_on=score_on)
        model.G.load_state_dict(generator.state_dict())
        results.append(model.validate())
        assert ("cldice" in batched_calls) == (score_on is not None)
    assert results[0]["threshold"] == results[1]["threshold"] and results[0]["dice"] == results[1]["dice"]
    assert results[1]["cldice"] == pytest.approx(results[0]["cldice"], abs=1e-12)

    seqs = load_sequences(run_dir / "soul.h5")
    state = torch.load(crgan.best_path, weights_only=True)["modules"]["generator"]
    train = [s.patient_id for s in seqs if s.split == "train"]
    val = [s for s in seqs if s.split == "val"]
    scores = []
    for score_on in (None, "cpu"):
        model = CRGAN(CONFIG.crgan, CONFIG.image_size, train, "cpu", val_seqs=val, score_on=score_on)
        model.generator.load_state_dict(state)
        scores.append(model.validate())
        assert ("paired_scores" in batched_calls) == (score_on is not None)
    assert scores[0].keys() == scores[1].keys()
    for k in scores[0]:
        assert scores[1][k] == pytest.approx(scores[0][k], abs=1e-4), k
