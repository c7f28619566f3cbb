"""The course study's measures behave: what a study of whole timelines gets from each way of filling the holes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark
from brvo_models.course_study import (
    PatientCourse,
    across_seeds,
    courses,
    interpolated_course,
    is_responder,
    locf_course,
    paired,
    patient_errors,
    population_error,
    study,
)

REPO = Path(__file__).resolve().parent.parent


def _patient(pid, truth, seen, fill=None, accepted=None):
    truth = [float(v) for v in truth]
    observed = {s: truth[s] for s in seen}
    fill = {s: truth[s] for s in range(6) if s not in seen} if fill == "truth" else (fill or {})
    return PatientCourse(pid, truth, observed, crgan_accepted=fill if accepted is None else accepted, crgan_all=fill)


def test_locf_and_interpolation_have_no_error_where_the_course_is_flat():
    flat = _patient("1", [12.0] * 6, seen=[0, 2])
    errors = patient_errors(flat)
    assert errors["locf"] == {"filled": 0.0, "all": 0.0}
    assert errors["interpolation"] == {"filled": 0.0, "all": 0.0}
    assert errors["complete_case"] == {"filled": None, "all": None}


def test_interpolation_is_exact_inside_a_straight_course_and_locf_is_not():
    line = _patient("1", [20, 18, 16, 14, 12, 10], seen=[0, 3, 5])
    errors = patient_errors(line)
    assert errors["interpolation"]["filled"] == pytest.approx(0.0)
    assert errors["locf"]["filled"] == pytest.approx(2.0)  # stage 1 carries 20 (true 18), stage 4 carries 14 (12)
    # after the last visit interpolation can only carry: a patient lost after stage 2 gets a flat tail
    lost = _patient("2", [20, 18, 16, 14, 12, 10], seen=[0, 1, 2])
    assert np.allclose(interpolated_course(lost.observed), [20, 18, 16, 16, 16, 16])
    assert np.allclose(locf_course(lost.observed), [20, 18, 16, 16, 16, 16])
    assert np.allclose(locf_course({2: 5.0, 4: 7.0}), [5, 5, 5, 5, 7, 7])  # a tie (stage 3) goes to the earlier


def _attrition_cohort(fill=None):
    """Ten responders (index falls 20 -> 5) seen at every stage, ten non-responders (flat at 20) who stop coming
    after s1t2: course-dependent attendance in its plainest form."""
    responders = [_patient(f"r{i}", [20, 17, 14, 11, 8, 5], seen=range(6), fill=fill) for i in range(10)]
    poor = [_patient(f"n{i}", [20 + 0.1 * i] * 6, seen=[0, 1], fill=fill) for i in range(10)]
    return responders + poor


def test_complete_case_population_mean_is_biased_under_course_dependent_attendance():
    cohort = _attrition_cohort()
    cc = population_error(cohort, "complete_case")
    assert cc[0] == pytest.approx(0.0) and cc[1] == pytest.approx(0.0)  # everyone seen
    assert cc[5] == pytest.approx(5.0 - np.mean([20 + 0.1 * i for i in range(10)]) / 2 - 2.5)  # only responders left
    assert cc[5] < -7
    # carrying the non-responders' flat course is right here; the fill with the truth is right everywhere
    assert np.allclose(population_error(cohort, "locf"), 0.0)
    result = study(_attrition_cohort(fill="truth"), n_resamples=200)
    assert result["population"]["crgan_all"]["mae"] == pytest.approx(0.0)
    assert result["paired"]["crgan_all vs interpolation"]["population_mae"]["verdict"] == "no difference shown"
    biased = study(cohort, n_resamples=200)["population"]["complete_case"]
    assert abs(biased["error"][5]) > 2 * biased["mae_se"]


def test_a_fill_that_carries_the_course_wins_the_paired_verdicts():
    """Patients lost after s2t1 whose index keeps falling: interpolation carries their last value, a fill with
    the truth does not; the fill is called lower on course MAE and correct on more responder calls."""
    rng = np.random.default_rng(0)
    cohort = []
    for i in range(12):
        start, step = rng.uniform(15, 25), rng.uniform(2.0, 3.5)
        truth = [start - step * s for s in range(6)]
        cohort.append(_patient(str(i), truth, seen=[0, 1, 2], fill="truth"))
    result = study(cohort, n_resamples=200)
    comp = result["paired"]["crgan_all vs interpolation"]
    assert comp["course_mae_filled"]["verdict"] == "A lower"
    assert comp["responder_correct"]["verdict"] == "A higher"
    assert result["responders"]["crgan_all"]["accuracy"] == 1.0
    assert result["responders"]["complete_case"]["n_called"] == 0  # nobody seen at s3t2: complete case cannot call
    assert result["course_error"]["interpolation"]["filled"] > 3.0


def test_accepted_rows_fall_back_to_interpolation_where_none_was_accepted():
    p = _patient("1", [20, 18, 16, 14, 12, 10], seen=[0, 2], fill={1: 30.0, 3: 14.0, 4: 12.0, 5: 10.0},
                 accepted={3: 14.0})
    c = courses(p)
    assert c["crgan_accepted"].tolist() == [20, 18, 16, 14, 16, 16]  # 1: interpolated, 3: accepted, 4-5: carried
    assert c["crgan_all"].tolist() == [20, 30, 16, 14, 12, 10]
    assert math.isnan(c["complete_case"][1]) and c["complete_case"][2] == 16


def test_responder_threshold_and_missing_ends():
    assert is_responder([20, 0, 0, 0, 0, 12]) is True       # 60 % of the first
    assert is_responder([20, 0, 0, 0, 0, 12.01]) is False
    assert is_responder([20, 0, 0, 0, 0, math.nan]) is None


def test_paired_rule_and_seeds():
    assert paired([0.1])["verdict"] == "not enough pairs"
    assert paired([-1.0, -1.1, -0.9, -1.0])["verdict"] == "A lower"
    assert paired([-1.0, 1.0, -0.5, 0.6])["verdict"] == "no difference shown"
    assert paired([1.0, 1.0, 1.0])["verdict"] == "A higher"  # SE 0, every pair the same way
    run = {"paired": {"a vs b": {"course_mae_filled": {"verdict": "A lower"}}}}
    other = {"paired": {"a vs b": {"course_mae_filled": {"verdict": "no difference shown"}}}}
    assert across_seeds([run]) == {"a vs b": {"course_mae_filled": "not enough seeds"}}
    assert across_seeds([run, run]) == {"a vs b": {"course_mae_filled": "A lower"}}
    assert across_seeds([run, other]) == {"a vs b": {"course_mae_filled": "no difference shown"}}


@pytest.mark.slow
def test_benchmark_reads_a_finished_run_and_its_truth(tiny_augment_run, tmp_path, capsys):
    """benchmarks/course_study.py on the session's tiny run and a truth of its phantom: every patient's course
    is the observed value at observed stages, the table and the one-seed WARNING are printed; a truth of another
    phantom is one line and exit 2."""
    import json

    from brvo_models.phantom import PhantomConfig
    from brvo_models.phantom.truth import write_truth

    _, run_dir, _ = tiny_augment_run
    bench = load_benchmark("course_study")
    write_truth(tmp_path / "truth", PhantomConfig(n_patients=8, seed=0), n_repeats=3)
    out = tmp_path / "course.json"
    assert bench.main([str(run_dir), str(tmp_path / "truth"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    res = saved["runs"][0]["results"]["non_perfusion"]
    assert res["n_patients"] == 8 and res["n_missed_pairs"] > 0
    assert saved["runs"][0]["filled_pairs"] == res["n_missed_pairs"]  # the pipeline fills every hole
    for method in ("locf", "interpolation", "crgan_accepted", "crgan_all"):
        assert res["course_error"][method]["filled"] is not None and res["course_error"][method]["filled"] >= 0
    assert "neighbour interpolation" in printed and "WARNING: course_study: one run only" in printed
    assert saved["verdicts_across_seeds"]["non_perfusion"]["crgan_all vs interpolation"]["course_mae_filled"] \
        == "not enough seeds"

    write_truth(tmp_path / "other", PhantomConfig(n_patients=8, seed=1), n_repeats=3)
    assert bench.main([str(run_dir), str(tmp_path / "other"), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not this run's phantom" in err and err.count("\n") == 1


def test_patient_table_lists_each_patient_with_a_missed_stage_once_per_run():
    from brvo_models.course_study import patient_table

    cohort = [_patient("1", [20, 18, 16, 14, 12, 10], seen=[0, 2], fill="truth"), _patient("2", [9] * 6, seen=range(6))]
    runs = [study(cohort, n_resamples=50), study(cohort, n_resamples=50)]
    table = patient_table(runs, [0, 1], {"1": [0, 2], "2": list(range(6))})
    rows = [line for line in table.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    # LOCF: 20, 16, 16, 16 against 18, 14, 12, 10; interpolation: 18, 16, 16, 16
    assert rows == ["| 1 | 02 | 3.50 | 3.00 | 0.00 | 0.00 | 0.00 | 0.00 |"]


def test_complete_case_bias_is_flagged_per_stage_and_a_correct_course_is_not():
    result = study(_attrition_cohort(fill="truth"), n_resamples=300)
    cc, fill = result["population"]["complete_case"], result["population"]["crgan_all"]
    assert cc["biased"][:2] == [False, False] and all(cc["biased"][2:])  # the non-responders left after s1t2
    assert not any(fill["biased"])
