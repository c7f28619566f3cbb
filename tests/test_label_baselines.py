"""The label baselines are kept by their own inputs: retraining Pix2Pix on the same data reuses them, and anything
they depend on (the data, the seed, the segmenter's budget, their code) makes them again."""
from __future__ import annotations

import json

import pytest

import tasks.shared.label_baselines as baselines_module
from conftest import write_blob_dataset
from tasks.config import preset
from tasks.pix2pix import load_split, mask_scores


def _score(masks, labels):
    return mask_scores(masks, labels)


@pytest.fixture
def counted_fits(monkeypatch):
    """How many times the segmenter baseline was trained."""
    calls = []
    original = baselines_module.fit_segmenter

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(baselines_module, "fit_segmenter", counting)
    return calls


def _baselines(soul, config, cache):
    return baselines_module.label_baselines(soul, config, cache, load_split=load_split, score=_score,
                                            log=lambda *_: None)


def test_a_pix2pix_retrain_on_the_same_data_reuses_the_baselines(tmp_path, counted_fits):
    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=8, image_size=32)
    cache = tmp_path / "cache"
    config = preset("tiny")
    first = _baselines(soul, config, cache)
    assert counted_fits == [config.seed] and len(list(cache.glob("*.json"))) == 1
    # another Pix2Pix recipe (objective, width, schedule): not an input of the baselines
    retrain = config.with_overrides(**{"pix2pix.lambda_dice": 7.0, "pix2pix.ngf": 16, "pix2pix.epochs": 3})
    assert _baselines(soul, retrain, cache) == first
    assert counted_fits == [config.seed]  # served, not trained again
    assert first["scores"]["segmenter"]["n"] == first["scores"]["otsu"]["n"] > 0


@pytest.mark.parametrize("change", ["seed", "segmenter_steps", "precision", "data"])
def test_what_the_baselines_depend_on_makes_them_again(tmp_path, counted_fits, change):
    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=8, image_size=32)
    cache = tmp_path / "cache"
    config = preset("tiny")
    _baselines(soul, config, cache)
    if change == "data":
        soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=8, image_size=32, seed=1)
    elif change == "precision":
        config = config.with_overrides(**{"pix2pix.precision": "bf16"})
    else:
        config = config.with_overrides(**{change: getattr(config, change) + 1})
    _baselines(soul, config, cache)
    assert len(counted_fits) == 2
    assert len(list(cache.glob("*.json"))) == 2


def test_a_damaged_cache_entry_is_computed_again_not_served(tmp_path, counted_fits):
    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=8, image_size=32)
    cache = tmp_path / "cache"
    config = preset("tiny")
    first = _baselines(soul, config, cache)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    logged = []
    again = baselines_module.label_baselines(soul, config, cache, load_split=load_split, score=_score,
                                             log=logged.append)
    assert len(counted_fits) == 2 and any("unreadable cache entry" in line for line in logged)
    assert again["scores"] == first["scores"]  # CPU training is deterministic
    assert json.loads(entry.read_text())["result"]["scores"] == first["scores"]  # rewritten whole


def test_pix2pix_recipes_trained_in_separate_directories_share_one_baselines_cache(tmp_path, counted_fits):
    """benchmarks/pix2pix_variants.py trains each recipe in a fresh directory: with one shared cache the
    baselines are made once per data and seed, and every recipe is compared with the same numbers."""
    from tasks.pix2pix import evaluate_pix2pix, train_pix2pix

    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=8, image_size=32)
    shared = tmp_path / "shared_baselines"
    sections = []
    for name, overrides in (("a", {}), ("b", {"pix2pix.lambda_dice": 3.0})):
        config = preset("tiny").with_overrides(**overrides)
        train_pix2pix(tmp_path / name, config, log=lambda *_: None, soul_h5=soul)
        sections.append(evaluate_pix2pix(tmp_path / name, config, log=lambda *_: None, soul_h5=soul,
                                         baselines_cache=shared))
    assert counted_fits == [preset("tiny").seed]
    assert sections[0]["baselines"] == sections[1]["baselines"]
    assert not (tmp_path / "a" / "cache").exists()  # the shared cache, not the run's, was used
