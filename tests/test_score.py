"""Scoring rules that decide which synthetic samples are accepted."""
import numpy as np
import pandas as pd
import pytest

from tasks.config import preset
from tasks.fill import missing_stages, sample_seed
from tasks.label import label_confidence
from tasks.score import (MIN_CALIBRATION_ROWS, AcceptanceThresholds, accept_mask, calibrate_thresholds,
                         calibration_rows, density_z_scores, nearest_observed_stage, summarise)


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
    thresholds = AcceptanceThresholds.from_config(cfg.with_overrides(acceptance="fixed"))
    assert accept_mask(pd.DataFrame(rows), thresholds).tolist() == [True, False, False, False, False]


def _real_scores(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"consistency_ssim": rng.uniform(0.4, 0.9, n), "realism": rng.uniform(0.5, 0.6, n),
                         "density_z": rng.normal(0.0, 0.5, n), "label_confidence": rng.uniform(0.97, 0.99, n)})


def test_calibrated_thresholds_are_quantiles_of_held_out_real_rows_and_realism_stays_fixed():
    cfg = preset("demo").with_overrides(acceptance_quantile=0.1)
    real = _real_scores(400)
    t = calibrate_thresholds(real, cfg, split="val", patients=8)
    assert t.source == "calibrated"
    assert t.min_consistency_ssim == pytest.approx(np.quantile(real["consistency_ssim"], 0.1))
    assert t.max_abs_density_z == pytest.approx(np.quantile(real["density_z"].abs(), 0.9))
    assert t.min_label_confidence == pytest.approx(np.quantile(real["label_confidence"], 0.1))
    assert t.min_realism == cfg.min_realism  # the discriminator's own score is not calibrated
    # three bounds, each rejecting a tenth of the real rows: between 70 % and 90 % of them pass all
    assert 0.7 <= t.calibration["real_pass_rate"] <= 0.9
    assert t.calibration["rows"] == 400 and t.calibration["split"] == "val" and t.calibration["quantile"] == 0.1
    assert t.rules()["density_z"] == f"|z| <= {t.max_abs_density_z:.4g}"


def test_calibrated_thresholds_reject_samples_unlike_real_rows_that_the_constants_accept():
    cfg = preset("demo")
    real = _real_scores(200, seed=1)
    like_real = _real_scores(100, seed=2)
    unsure_labels = like_real.assign(label_confidence=0.9)    # labels far less confident than any real row's
    too_dense = like_real.assign(density_z=2.5)               # inside the constant |z| <= 3, far outside real rows
    fixed = AcceptanceThresholds.from_config(cfg.with_overrides(acceptance="fixed"))
    calibrated = calibrate_thresholds(real, cfg)
    for odd in (unsure_labels, too_dense):
        assert accept_mask(odd, fixed).all()
        assert not accept_mask(odd, calibrated).any()
    assert accept_mask(like_real, calibrated).mean() > 0.75  # samples that look like real rows mostly pass


def test_calibration_uses_val_patients_seen_twice_and_adds_train_rows_only_when_too_few():
    def meta(n_val_rows: int) -> tuple[pd.DataFrame, dict]:
        rows = [("v1", s % 2, "val") for s in range(n_val_rows)]       # v1: two stages
        rows += [("v2", 0, "val")] * 30                                 # v2: one stage, nothing to compare with
        rows += [("t1", s % 3, "train") for s in range(30)]
        df = pd.DataFrame(rows, columns=["patient_id", "stage", "split"])
        observed = df.groupby("patient_id")["stage"].apply(lambda s: sorted(set(s))).to_dict()
        return df, observed

    df, observed = meta(MIN_CALIBRATION_ROWS)
    rows, splits = calibration_rows(df, observed)
    assert splits == "val" and set(df.iloc[rows]["patient_id"]) == {"v1"}
    df, observed = meta(MIN_CALIBRATION_ROWS - 1)
    rows, splits = calibration_rows(df, observed)
    assert splits == "val+train" and set(df.iloc[rows]["patient_id"]) == {"v1", "t1"}


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


def test_too_few_real_rows_fall_back_to_the_constants_with_a_warning():
    import logging

    from tasks.score import calibrated_on_real_rows

    cfg = preset("demo")
    meta = pd.DataFrame({"patient_id": ["a", "a", "b"], "stage": [0, 1, 0], "split": ["val", "val", "train"]})
    observed = {"a": [0, 1], "b": [0]}
    logged = []

    def never(*_):
        raise AssertionError("nothing to score: the fallback needs no model")

    t = calibrated_on_real_rows(meta, None, observed, cfg, "no-checkpoint.pt", never,
                                log=lambda msg, level=logging.INFO: logged.append((level, msg)))
    assert t.source == "config" and t.min_label_confidence == cfg.min_label_confidence
    assert "2 real rows" in t.calibration["fallback_reason"]
    assert [level for level, _ in logged] == [logging.WARNING] and "not calibrated" in logged[0][1]


def _scarce_meta():
    meta = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c", "c", "v", "t"],
                         "split": ["train"] * 6 + ["val", "test"]})
    densities = np.array([0.20, 0.22, 0.30, 0.32, 0.25, 0.27, 0.24, 0.26])
    return meta, densities


def test_a_label_scarce_run_never_reads_an_unlabelled_train_patients_annotations():
    """With labelled_train_patients set, the acceptance floor, each patient's mean density and the population
    spread must not depend on the other train patients' annotations: a clinic with few annotated patients has
    none for them. Their synthetic rows are then judged against the population mean."""
    from tasks.score import annotation_statistics, readable_annotations

    meta, densities = _scarce_meta()
    readable = readable_annotations(meta, ("a",))
    assert readable.tolist() == [True, True, False, False, False, False, True, True]
    before = annotation_statistics(meta, densities, readable)
    altered = densities.copy()
    altered[2:6] = [0.9, 0.01, 0.95, 0.02]  # b's and c's annotations: unreadable, so nothing may move
    after = annotation_statistics(meta, altered, readable)
    pd.testing.assert_series_equal(before[0], after[0])
    assert before[1] == after[1] and before[2] == after[2]
    readable_mean = densities[readable].mean()
    assert before[0]["b"] == pytest.approx(readable_mean) and before[0]["a"] == pytest.approx(0.21)
    assert before[2]["label_density_source"].startswith("2 train annotations of 1 patients")


def test_without_labelled_train_patients_every_annotation_is_read_as_before():
    from tasks.score import annotation_statistics, label_floor_fields, readable_annotations

    meta, densities = _scarce_meta()
    patient_density, spread, floor = annotation_statistics(meta, densities, readable_annotations(meta, None))
    assert patient_density["b"] == pytest.approx(0.31) and spread == pytest.approx(densities.std())
    assert floor == label_floor_fields(meta, densities)
