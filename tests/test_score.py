"""Scoring rules that decide which synthetic samples are accepted."""
import numpy as np
import pandas as pd
import pytest

from tasks.config import preset
from tasks.fill_stages import missing_stages, sample_seed
from tasks.label import label_confidence
from tasks.score import accept_mask, density_z_scores, nearest_observed_stage, summarise


def test_nearest_observed_stage_prefers_closest_then_earlier():
    assert nearest_observed_stage([0, 4], 1) == 0
    assert nearest_observed_stage([0, 4], 3) == 4
    assert nearest_observed_stage([1, 3], 2) == 1  # tie -> earlier
    with pytest.raises(ValueError):
        nearest_observed_stage([], 2)


def test_density_z_is_patient_offset_in_population_units():
    z = density_z_scores(np.array([0.10, 0.20]), np.array([0.10, 0.10]), population_std=0.05)
    np.testing.assert_allclose(z, [0.0, 2.0])


def test_accept_mask_applies_every_threshold():
    cfg = preset("demo")
    good = {"consistency_ssim": 0.9, "realism": 0.5, "density_z": 0.0, "label_confidence": 0.95}
    rows = [good,
            {**good, "consistency_ssim": cfg.min_consistency_ssim - 0.01},
            {**good, "realism": cfg.min_realism - 0.01},
            {**good, "density_z": -(cfg.max_abs_density_z + 0.1)},
            {**good, "label_confidence": cfg.min_label_confidence - 0.01}]
    assert accept_mask(pd.DataFrame(rows), cfg).tolist() == [True, False, False, False, False]


def test_label_confidence_range():
    decided = np.zeros((1, 4, 4), np.float32)
    undecided = np.full((1, 4, 4), 0.5, np.float32)
    np.testing.assert_allclose(label_confidence(np.concatenate([decided, undecided])), [1.0, 0.5])


def test_missing_stages_lists_every_hole_per_patient():
    meta = pd.DataFrame({"patient_id": ["1", "1", "2"], "stage": [0, 3, 5]})
    assert missing_stages(meta) == {"1": [1, 2, 4, 5], "2": [0, 1, 2, 3, 4]}


def test_sample_seed_stable_and_distinct():
    assert sample_seed(0, "7", 2, 1) == sample_seed(0, "7", 2, 1)
    seeds = {sample_seed(0, "7", s, k) for s in range(6) for k in range(4)}
    assert len(seeds) == 24
    assert sample_seed(1, "7", 2, 1) != sample_seed(0, "7", 2, 1)


def test_summarise_ignores_nan():
    df = pd.DataFrame({k: [np.nan, 1.0, 3.0] for k in ("consistency_ssim", "realism", "density_z",
                                                       "label_confidence")})
    assert summarise(df)["realism"]["mean"] == pytest.approx(2.0)
