"""The learning-curve gate and the verdicts it allows: one seed decides nothing, a flat curve is not 'no difference'."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.analyses.usefulness_protocol import paired_verdict


def test_a_one_seed_forecast_loss_is_never_read_as_no_difference_nor_as_a_difference():
    """A 30-fold forecast MAE loss with one seed: no SE exists, so the verdict is 'not enough seeds'."""
    out = paired_verdict([0.0115], [0.3655], higher_is_better=False)
    assert out["verdict"] == "not enough seeds"
    assert out["mean_gain"] == pytest.approx(0.0115 - 0.3655)  # the number is kept, only the verdict withheld


def test_an_undefined_se_is_not_enough_seeds():
    assert paired_verdict([0.6, np.nan, 0.6], [0.7, 0.7, 0.7], True)["verdict"] == "not enough seeds"


# ------------------------------------------------------------------------------ a one-seed run, end to end

from brvo_models.configs import ForecastRecipe, SegmenterRecipe, UsefulnessConfig  # noqa: E402
from tasks.analyses.usefulness_protocol import (  # noqa: E402
    GATE_RULE,
    StudyData,
    gated,
    judge_gate,
    load_study_data,
    render_markdown,
    rows_help,
    rows_help_status,
    run_protocol,
    usage_advice,
    verdict_lines,
)
from tests.conftest import wrongly_labelled_copies, write_blob_dataset  # noqa: E402

FAST = dict(segmenter=SegmenterRecipe(width=8, steps=60, batch_size=8, validations=2),
            forecaster=ForecastRecipe(width=4, steps=20, batch_size=8))


@pytest.fixture(scope="module")
def blob_study(tmp_path_factory) -> StudyData:
    path = write_blob_dataset(tmp_path_factory.mktemp("blob") / "soul.h5", n_patients=12, image_size=32,
                              missing_prob=0.2)
    return load_study_data(path, path)


def test_a_one_seed_run_with_a_large_loss_reports_not_enough_seeds_everywhere(blob_study):
    from tasks.rendering.report import bar_checks, render_card, render_report, warnings_of

    data = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"], copies=2))
    config = UsefulnessConfig(seeds=1, arms=("real_plus_synthetic",), low_data_fractions=(), tasks=("segmentation",),
                              **FAST)
    result = run_protocol(data, config, log=lambda _: None)
    (cmp,) = result["comparisons"]
    assert cmp["mean_gain"] < -0.05, cmp  # the loss is there, and large
    assert cmp["verdict"] == "not enough seeds" and cmp["rule_verdict"] == "not enough seeds"
    gate = result["gate"]["groups"]["full_data"]["tasks"]["segmentation"]
    assert gate["measurable"] is None and gate["reason"].startswith("not enough seeds")
    result["verdicts"] = verdict_lines(result)
    result["rows_help"] = rows_help(result)
    report = {"usefulness": result}
    texts = [render_markdown(result), usage_advice(result), *result["verdicts"], render_report(report, "blobs"),
             render_card(report, {}, "blobs")]
    for text in texts:
        lowered = text.lower()
        assert "no difference" not in lowered and "**gain**" not in lowered and "**loss**" not in lowered, text
        assert "helped by the declared rule" not in lowered and "hurt by the declared rule" not in lowered
    assert rows_help_status(result)["status"] == "not measurable"
    assert bar_checks(report) == {"synthetic_rows_help": False}  # never silently passed
    warnings = warnings_of(report)
    assert any(w.startswith("usefulness: synthetic_rows_help not measurable: not enough seeds") for w in warnings)
    assert any("full_data arms on segmentation are not measurable: not enough seeds" in w for w in warnings)


# ------------------------------------------------------------------------------ the gate on constructed curves


def _curve(points: dict[float, tuple[list[float], int]], task: str = "segmentation") -> dict:
    return {f: {"patients": [n] * len(v), task: v} for f, (v, n) in points.items()}


FLAT = {0.25: ([0.680, 0.690, 0.670], 9), 0.5: ([0.681, 0.689, 0.672], 18), 1.0: ([0.682, 0.688, 0.671], 37)}
RISING = {0.25: ([0.50, 0.52, 0.49], 9), 0.5: ([0.60, 0.61, 0.59], 18), 1.0: ([0.68, 0.69, 0.67], 37)}


def test_a_flat_curve_makes_the_arm_not_measurable_and_names_where_it_saturates():
    gate = judge_gate(_curve(FLAT), {"full_data": 0.5, "low_data_25": 0.25}, ("segmentation",))
    assert gate["rule"] == GATE_RULE
    for group, n in (("full_data", 18), ("low_data_25", 9)):
        g = gate["groups"][group]["tasks"]["segmentation"]
        assert g["measurable"] is False and g["reason"].startswith(f"real-only is saturated at {n} patients")
    assert gate["stops_improving"]["segmentation"]["patients"] == 9
    points = gate["curve"]["segmentation"]
    assert [p["patients"] for p in points] == [9, 18, 37] and points[0]["se"] > 0
    # a mix that loses by the rule in a flat arm: not 'no difference', not a bare loss either; the loss stays named
    cmp = {"arm": "low_data_25_real_plus_synthetic", "baseline": "low_data_25_real", "task": "segmentation",
           "metric": "dice", "group": "low_data_25", "adds_synthetic": True, "baseline_role": "real_only",
           **paired_verdict([0.68, 0.69, 0.67], [0.60, 0.611, 0.589], True)}
    out = gated(cmp, gate["groups"]["low_data_25"]["tasks"]["segmentation"])
    assert out["verdict"] == "not measurable here: real-only is saturated at 9 patients"
    assert out["rule_verdict"] == "loss"
    result = {"comparisons": [out], "gate": gate, "seeds": [0, 1, 2]}
    status = rows_help_status(result)
    assert status["status"] == "not measurable" and "saturated at 9 patients" in status["reason"]
    assert "by the rule alone: loss" in usage_advice(result)
    noise = gated({**cmp, **paired_verdict([0.68, 0.69, 0.67], [0.681, 0.689, 0.671], True)},
                  gate["groups"]["low_data_25"]["tasks"]["segmentation"])
    assert noise["rule_verdict"] == "no difference shown"
    assert "no difference" not in usage_advice({"comparisons": [noise], "gate": gate}).lower()


def test_a_rising_curve_makes_every_arm_measurable():
    gate = judge_gate(_curve(RISING), {"full_data": 0.5, "low_data_25": 0.25}, ("segmentation",))
    assert all(gate["groups"][g]["tasks"]["segmentation"]["measurable"] for g in ("full_data", "low_data_25"))
    assert gate["stops_improving"]["segmentation"]["text"] == "still improving at the full split (37 patients)"


def test_saturation_is_named_at_the_smallest_size_the_full_split_no_longer_beats():
    curve = {0.25: ([0.50, 0.52, 0.49], 9), 0.5: ([0.681, 0.689, 0.672], 18), 1.0: ([0.682, 0.688, 0.671], 37)}
    gate = judge_gate(_curve(curve), {"low_data_25": 0.25, "low_data_50": 0.5}, ("segmentation",))
    assert gate["stops_improving"]["segmentation"]["patients"] == 18
    assert gate["stops_improving"]["segmentation"]["text"] == "stops improving at 18 patients (50 % of the train split)"
    assert gate["groups"]["low_data_25"]["tasks"]["segmentation"]["measurable"] is True
    assert gate["groups"]["low_data_50"]["tasks"]["segmentation"]["measurable"] is False


# ------------------------------------------------------------------------------ the bar, restated


def _mix(task: str, baseline_values, arm_values, role: str = "real_only", measurable: bool | None = True,
         arm: str = "low_data_25_real_plus_synthetic") -> dict:
    higher = task == "segmentation"
    gate = {"measurable": measurable, "patients": 9, "reason": "constructed"}
    cmp = {"arm": arm, "baseline": "x", "baseline_role": role, "task": task, "metric": "dice" if higher else "mae",
           "group": "low_data_25", "adds_synthetic": True, **paired_verdict(baseline_values, arm_values, higher)}
    return gated(cmp, gate)


GAIN = ([0.60, 0.61, 0.62], [0.64, 0.651, 0.659])
LOSS = ([0.60, 0.61, 0.62], [0.55, 0.561, 0.569])
NOISE = ([0.60, 0.61, 0.62], [0.61, 0.60, 0.62])


@pytest.mark.parametrize("comparisons, status", [
    ([_mix("segmentation", *GAIN), _mix("segmentation", *GAIN, role="same_information_alternative")], "met"),
    ([_mix("segmentation", *GAIN)], "not shown"),
    ([_mix("segmentation", *GAIN), _mix("segmentation", *NOISE, role="same_information_alternative")], "missed"),
    ([_mix("segmentation", *GAIN), _mix("segmentation", *GAIN, role="same_information_alternative"),
      _mix("response", *GAIN)], "missed"),  # a measurable loss elsewhere (lower MAE is better: these numbers rise)
    ([_mix("segmentation", *GAIN, measurable=False),
      _mix("segmentation", *GAIN, role="same_information_alternative", measurable=False)], "not measurable"),
])
def test_the_bar_needs_a_measurable_arm_and_a_gain_over_the_same_information_alternative(comparisons, status):
    result = {"comparisons": comparisons, "seeds": [0, 1, 2]}
    assert rows_help_status(result)["status"] == status
    assert rows_help(result) is (status == "met")


def test_a_bar_that_cannot_be_called_is_a_warning_with_its_reason():
    from tasks.rendering.report import bar_checks, warnings_of

    report = {"usefulness": {"comparisons": [_mix("segmentation", *GAIN)], "seeds": [0, 1, 2]}}
    assert bar_checks(report) == {"synthetic_rows_help": False}
    assert ("usefulness: synthetic_rows_help not shown: no same-information alternative was run: "
            "low_data_25_real_plus_synthetic on segmentation beats real-only by the rule") in warnings_of(report)


def test_report_card_and_ui_say_which_arms_were_measurable_and_why_not(tmp_path):
    from tasks.rendering.artifacts import result_markdown
    from tasks.rendering.report import render_card, render_report

    gate = judge_gate(_curve(FLAT), {"full_data": 0.5, "low_data_25": 0.25}, ("segmentation",))
    cmp = {"arm": "real_plus_synthetic", "baseline": "real_only", "baseline_role": "real_only", "task": "segmentation",
           "metric": "dice", "group": "full_data", "adds_synthetic": True,
           **paired_verdict([0.68, 0.69, 0.67], [0.60, 0.611, 0.589], True)}
    cmp = gated(cmp, gate["groups"]["full_data"]["tasks"]["segmentation"])
    arm = lambda v: {"n_rows": [10] * 3, "n_synthetic_rows": [0] * 3, "n_patients": [4] * 3,  # noqa: E731
                     "tasks": {"segmentation": {"dice": {"mean": v, "sd": 0.01, "per_seed": [v] * 3}}}}
    use = {"rule": "r", "eval_split": "test", "seeds": [0, 1, 2], "arms": {"real_only": arm(0.68),
           "real_plus_synthetic": arm(0.60)}, "comparisons": [cmp], "gate": gate, "references": {},
           "generators": "the full-data mixes use the run's one trained Pix2Pix and CRGAN"}
    report = {"usefulness": use}
    summary = {"augmented_h5": "a.h5", "n_real": 1, "n_synthetic": 0, "n_accepted": 0}
    warning = ("usefulness: the full_data arms on segmentation are not measurable: real-only is saturated at 18 "
               "patients")
    for doc in (render_report(report, "x"), render_card(report, {}, "x"), result_markdown(tmp_path, report, summary)):
        assert f"**WARNING** {warning}" in doc
        assert "usefulness: synthetic_rows_help not measurable" in doc
    for doc in (render_report(report, "x"), render_card(report, {}, "x")):
        assert "| full_data | segmentation | **no** | real-only is saturated at 18 patients" in doc
        assert "**not measurable here: real-only is saturated at 18 patients** (by the rule alone: loss)" in doc
        assert ("Where real-only stops improving: segmentation: stops improving at or below 9 patients (25 % of the "
                "train split, the smallest size measured)") in doc
        assert "Generators behind the verdicts: the full-data mixes use the run's one trained" in doc


def test_label_scarce_comparisons_plug_into_the_bar_by_name_role_and_primary_metric():
    """The label-scarce study's comparisons (labels_10_plus_synthetic / _plus_both vs labelled-only and vs
    self-training, several metrics) are read by the bar: only the primary metric decides, and its roles count."""
    def c(arm, role, values, metric="dice"):
        return gated({"arm": arm, "baseline": "b", "baseline_role": role, "task": "segmentation", "metric": metric,
                      **paired_verdict(*values, True)}, {"measurable": True, "patients": 4, "reason": "constructed"})

    both = [c("labels_10_plus_both", "real_only", GAIN), c("labels_10_plus_both", "same_information_alternative", GAIN),
            c("labels_10_plus_both", "real_only", LOSS, metric="cldice")]  # a secondary metric does not decide
    assert rows_help_status({"comparisons": both})["status"] == "met"
    only_real = [c("labels_10_plus_synthetic", "real_only", GAIN)]
    assert rows_help_status({"comparisons": only_real})["status"] == "not shown"


# ------------------------------------------------------------------------------ real-only kept by its inputs


def test_a_rerun_with_another_generator_trains_only_the_mixes_and_gives_the_same_result(blob_study, tmp_path,
                                                                                      monkeypatch):
    """The real-only arm and the gate's points do not depend on the generator: a second run on the same real rows
    (another generator's synthetic rows) serves them from the cache and trains only the mix; its real-only
    numbers are those of a run without the cache. Anything they depend on (here the seeds) computes them again."""
    import tasks.analyses.usefulness_protocol as protocol

    config = UsefulnessConfig(seeds=2, arms=("real_plus_synthetic",), low_data_fractions=(), **FAST)
    first_gen = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"], 1))
    second_gen = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"], 2))
    cache = tmp_path / "real_only"
    trained = []
    original = protocol.run_segmentation_seeds

    def counting(trains, *args, **kwargs):
        trained.append(sum(int(t.is_synthetic.any()) for t in trains))
        return original(trains, *args, **kwargs)

    monkeypatch.setattr(protocol, "run_segmentation_seeds", counting)
    uncached = run_protocol(second_gen, config, log=lambda _: None)
    trained.clear()
    run_protocol(first_gen, config, log=lambda _: None, real_only_cache=cache)
    assert trained == [0, 2, 0]  # real-only, the mix, the gate's half split
    trained.clear()
    served = run_protocol(second_gen, config, log=lambda _: None, real_only_cache=cache)
    assert trained == [2]  # only the mix trained
    same = lambda part: json.dumps(served[part], sort_keys=True) == json.dumps(uncached[part], sort_keys=True)  # NaN too
    assert same("arms") and same("gate") and same("comparisons")
    trained.clear()
    run_protocol(second_gen, config.model_copy(update={"seeds": 3}), log=lambda _: None, real_only_cache=cache)
    assert trained == [0, 3, 0]
