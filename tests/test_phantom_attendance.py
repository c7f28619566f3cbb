"""Course-dependent attendance: poor responders stop coming earlier, and the default plan is unchanged."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from brvo_models.phantom.anatomy import build_anatomy
from brvo_models.phantom.config import PhantomConfig
from brvo_models.phantom.visit_plan import (
    plan_visits,
    reperfusion_rates,
    stage_patient_counts,
)

#: The shares of the truth phantoms C-F (SOUL's shape with more patients kept early).
CLINIC = (0.9056603773584906, 0.6792452830188679, 0.6981132075471698, 0.49056603773584906, 0.37735849056603776,
          0.20754716981132076)

#: sha256 (first 16 hex) of attendance (uint8) + exam counts (int64) of plans made by the code before the option
#: existed (main at e371cca).
RECORDED_PLANS = {
    (53, 0, None): "681a879141580f2d",
    (24, 12, CLINIC): "6282ce3cc92c3249",
    (16, 13, CLINIC): "d2f2af09aa4908a3",
    (200, 7, None): "38df61a421c805b1",
}


def _config(n: int, seed: int, attendance, **extra) -> PhantomConfig:
    fields = dict(n_patients=n, seed=seed, **extra)
    if attendance is not None:
        fields.update(attendance=attendance, images_per_visit=(1, 3))
    return PhantomConfig(**fields)


def _digest(config: PhantomConfig) -> str:
    plan = plan_visits(config)
    return hashlib.sha256(plan.attendance.astype(np.uint8).tobytes()
                          + plan.exam_counts.astype(np.int64).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("key", list(RECORDED_PLANS))
def test_default_and_explicit_zero_keep_every_plan_bit_for_bit(key):
    n, seed, attendance = key
    assert _digest(_config(n, seed, attendance)) == RECORDED_PLANS[key]
    assert _digest(_config(n, seed, attendance, attendance_follows_response=0.0)) == RECORDED_PLANS[key]


def _last_visits(config: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    plan = plan_visits(config)
    last = np.array([np.flatnonzero(row).max() for row in plan.attendance])
    return last, reperfusion_rates(config)


def test_poor_responders_stop_coming_earlier_with_the_option_only():
    """200 patients: the phantom's non-responders (reperfusion rate < 0.1) leave at least a stage earlier on
    average than responders with the option; without it their last visits are alike. The stage counts stay
    the config's shares either way."""
    for weight, expect_earlier in ((0.0, False), (0.8, True)):
        config = PhantomConfig(n_patients=200, seed=7, image_size=32, attendance_follows_response=weight)
        last, rates = _last_visits(config)
        poor = rates < 0.1
        assert 20 < poor.sum() < 80  # about a fifth of the patients do not respond, by the phantom's design
        gap = last[~poor].mean() - last[poor].mean()
        if expect_earlier:
            assert gap >= 1.0, (weight, gap)
        else:
            assert abs(gap) < 0.6, (weight, gap)
        counts = plan_visits(config).attendance.sum(axis=0)
        assert tuple(counts) == stage_patient_counts(200, config.attendance)


def test_the_rates_are_the_rendered_patients_own():
    """The plan ranks patients by the reperfusion rate the anatomy renders, not a draw of its own."""
    config = PhantomConfig(n_patients=5, seed=3, image_size=32, attendance_follows_response=1.0)
    rates = reperfusion_rates(config)
    assert rates == pytest.approx([build_anatomy(config, p).params.rate for p in range(5)], abs=0)


def test_the_option_is_range_checked_and_named_in_describe():
    from brvo_models.phantom.config import phantom_config
    from storage.errors import BrvoError

    with pytest.raises(BrvoError, match="attendance_follows_response"):
        phantom_config(attendance_follows_response=1.5)
    assert "attendance_follows_response=0.8" in PhantomConfig(attendance_follows_response=0.8).describe()


def test_cli_flag_reaches_the_config(capsys):
    from flows.cli import main

    code = main(["phantom", "/nonexistent/out", "--attendance-follows-response", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "attendance_follows_response" in err and err.count("\n") == 1
