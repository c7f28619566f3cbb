"""The treatment-effect check of the synthetic rows (tasks/analyses/stage_trend.py): a flat or offset synthetic timeline
is a WARNING a researcher sees; rows that follow the real effect pass."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.rendering.report import render_report, warnings_of
from tasks.analyses.stage_trend import stage_trend, trend_warnings

SLOPE = 0.01  # the real treatment effect: +0.01 vessel density per stage


PATTERNS = ((0, 1), (0, 2), (0, 1, 4), (0, 3), (2, 5), (0, 5))  # observed stages, as attendance thins


def _nearest(observed, stage):
    return min(observed, key=lambda s: (abs(s - stage), s))  # the earlier on a tie


def _cohort(synthetic_density, n_patients: int = 12, seed: int = 0, accepted: bool = True):
    """Patients observed at the PATTERNS' stages (two noisy scans each); every other stage synthetic (two samples).
    ``synthetic_density(base, stage, nearest_real_stage)`` gives a synthetic sample's density."""
    rng = np.random.default_rng(seed)
    rows, dens = [], []
    for p in range(n_patients):
        base = 0.1 + 0.02 * rng.random()
        observed = PATTERNS[p % len(PATTERNS)]
        for stage in range(6):
            synthetic = stage not in observed
            for _ in range(2):
                rows.append((str(p), stage, synthetic, accepted if synthetic else False))
                value = synthetic_density(base, stage, _nearest(observed, stage)) if synthetic else base + SLOPE * stage
                dens.append(value + rng.normal(0, 0.002))
    meta = pd.DataFrame(rows, columns=["patient_id", "stage", "is_synthetic", "accepted"])
    return meta, np.asarray(dens)


def test_rows_that_follow_the_real_effect_pass():
    meta, dens = _cohort(lambda base, stage, _: base + SLOPE * stage)
    t = stage_trend(meta, dens)
    assert t["real_effect_present"] and t["real_slope_per_stage"] == pytest.approx(SLOPE, abs=0.001)
    assert t["synthetic_slope_per_stage"] == pytest.approx(SLOPE, abs=0.002)
    assert abs(t["synthetic_bias"]) < 0.002
    assert not t["flat"] and not t["offset"] and trend_warnings(t) == []
    json.dumps(t, allow_nan=False)  # report.json stays strict JSON


def test_a_generator_that_copies_the_nearest_stage_is_flat_and_warned():
    meta, dens = _cohort(lambda base, _stage, nearest: base + SLOPE * nearest)  # the copy: no change at all
    t = stage_trend(meta, dens)
    assert t["flat"] and not t["offset"]
    assert t["effect_share"] < 0.5
    (warning,) = trend_warnings(t)
    assert "miss the treatment effect" in warning and "+0.0100 per stage" in warning


def test_a_density_offset_beyond_one_stage_of_change_is_warned():
    meta, dens = _cohort(lambda base, stage, _: base + SLOPE * stage + 3 * SLOPE)
    t = stage_trend(meta, dens)
    assert t["offset"] and not t["flat"]
    assert t["synthetic_bias"] == pytest.approx(3 * SLOPE, abs=0.002)
    assert "not comparable" in trend_warnings(t)[0]


def test_real_data_without_an_effect_is_rarely_called_flat():
    """The 2-SE rule on the real slope: about 5 % false alarms when there is no effect, not more."""
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        meta, dens = _cohort(lambda base, _stage, nearest: base, seed=seed)
        real = ~meta["is_synthetic"].to_numpy()
        patient_base = meta["patient_id"].astype(int).to_numpy() * 0.001
        dens[real] = 0.1 + patient_base[real] + rng.normal(0, 0.002, real.sum())  # no stage effect at all
        alarms += stage_trend(meta, dens)["flat"]
    assert alarms <= 5


def test_only_accepted_rows_count_and_none_accepted_falls_back_to_all():
    meta, dens = _cohort(lambda base, stage, _: base + SLOPE * stage)
    n_missing = int(meta.loc[meta["is_synthetic"], ["patient_id", "stage"]].drop_duplicates().shape[0])
    drop = meta["is_synthetic"] & (meta["stage"] == 3)
    meta.loc[drop, "accepted"] = False
    n_drop = int(meta.loc[drop, "patient_id"].nunique())
    assert stage_trend(meta, dens)["n_synthetic_stages"] == n_missing - n_drop
    meta, dens = _cohort(lambda base, stage, _: base + SLOPE * stage, accepted=False)
    t = stage_trend(meta, dens)
    assert t["synthetic_rows"] == "all (none accepted)" and t["n_synthetic_stages"] == n_missing


def test_the_warning_reaches_the_report_and_its_warnings():
    meta, dens = _cohort(lambda base, _stage, nearest: base + SLOPE * nearest)
    trend = stage_trend(meta, dens)
    report = {"synthetic": {"n": 72, "accepted": 72, "per_stage": {}, "scores": {}, "stage_trend": trend}}
    assert any("miss the treatment effect" in w for w in warnings_of(report))
    text = render_report(report, "phantom")
    assert "## Treatment effect in the synthetic rows" in text and "Verdict: flat." in text


def test_the_ui_summary_shows_the_effect_and_its_warning(tmp_path):
    from tasks.rendering.artifacts import result_markdown

    meta, dens = _cohort(lambda base, _stage, nearest: base + SLOPE * nearest)
    report = {"synthetic": {"n": 72, "accepted": 72, "stage_trend": stage_trend(meta, dens)}}
    summary = {"augmented_h5": "a.h5", "n_real": 1, "n_synthetic": 72, "n_accepted": 72}
    text = result_markdown(tmp_path, report, summary)
    assert "**WARNING** the synthetic rows miss the treatment effect" in text
    assert "| treatment effect (label density per stage) | real +0.0100, synthetic" in text and ": FLAT |" in text
