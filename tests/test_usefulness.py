"""The usefulness protocol: its rule, its arms, its tasks and the low-data subsets' isolation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel

from brvo_models.configs import ForecastRecipe, SegmenterRecipe, UsefulnessConfig
from storage.paired_format import STAGE_NAMES, read_arrays, read_meta
from storage.work_files import write_work_file
from tasks.analyses.usefulness_protocol import (
    Rows,
    StudyData,
    SubsetRequest,
    load_study_data,
    mix_settings,
    paired_verdict,
    render_markdown,
    response_pairs,
    gated,
    rows_help,
    run_protocol,
    subset_patients,
    usage_advice,
    verdict_lines,
)
from tasks.analyses.usefulness_subsets import SUBSET_PLAN, SUBSET_SOUL, PipelineSubsetMaker
from tasks.engine import Step
from tests.conftest import wrongly_labelled_copies, write_blob_dataset

FAST = dict(segmenter=SegmenterRecipe(width=8, steps=150, batch_size=8, validations=3),
            forecaster=ForecastRecipe(width=4, steps=20, batch_size=8))


# ------------------------------------------------------------------------------------- the rule


def test_rule_calls_a_planted_gain_real_and_its_mirror_a_loss():
    rng = np.random.default_rng(0)
    base = 0.60 + 0.01 * rng.standard_normal(5)
    arm = base + 0.02 + 0.002 * rng.standard_normal(5)  # seed-paired: the seed effect cancels
    assert paired_verdict(base.tolist(), arm.tolist(), higher_is_better=True)["verdict"] == "gain"
    assert paired_verdict(arm.tolist(), base.tolist(), higher_is_better=True)["verdict"] == "loss"
    # an error metric: lower is better, so the same numbers read the other way
    assert paired_verdict(base.tolist(), arm.tolist(), higher_is_better=False)["verdict"] == "loss"


def test_rule_rarely_calls_zero_mean_noise_real():
    rng = np.random.default_rng(1)
    calls = [paired_verdict(list(0.6 + 0.01 * rng.standard_normal(3)), list(0.6 + 0.01 * rng.standard_normal(3)),
                            True)["verdict"] for _ in range(400)]
    false_alarms = sum(c != "no difference shown" for c in calls) / len(calls)
    assert false_alarms < 0.09  # a 5 % two-sided test; 400 draws


def test_rule_reports_its_numbers_and_needs_paired_lists():
    out = paired_verdict([0.5, 0.6, 0.7], [0.52, 0.61, 0.73], True)
    assert out["per_seed_gain"] == pytest.approx([0.02, 0.01, 0.03])
    assert out["mean_gain"] == pytest.approx(0.02)
    assert out["se"] == pytest.approx(0.01 / np.sqrt(3))
    assert out["t_crit"] == pytest.approx(4.303, abs=1e-3)
    assert out["verdict"] == "no difference shown"  # 0.02 < 4.30 x 0.0058
    with pytest.raises(ValueError):
        paired_verdict([0.5, 0.6], [0.5], True)
    assert paired_verdict([0.5], [0.9], True)["verdict"] == "not enough seeds"  # one seed decides nothing


# ----------------------------------------------------------------------------------- the rows


def _rows(patients, stages, synthetic, image_size=8, labels=None):
    n = len(patients)
    lab = np.zeros((n, image_size, image_size), np.uint8) if labels is None else labels
    return Rows(np.zeros((n, image_size, image_size), np.uint8), lab, np.asarray(patients, str),
                np.asarray(stages, np.int64), np.asarray(synthetic, bool), np.ones(n, bool))


def test_response_pairs_link_each_visit_to_every_later_stage_and_weight_synthetic_ends():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, :2] = 1   # p1 stage 0: density 0.25
    labels[1, :4] = 1   # p1 stage 2: density 0.5
    labels[2, :6] = 1   # p1 stage 3 (synthetic): density 0.75
    labels[3, :1] = 1   # p2 stage 1, alone: no pair
    rows = _rows(["1", "1", "1", "2"], [0, 2, 3, 1], [False, False, True, False], labels=labels)
    pairs = response_pairs(rows, synthetic_weight=0.3)
    got = sorted(zip(pairs["row"], pairs["a"], pairs["b"], np.round(pairs["change"], 4), pairs["weight"]))
    assert got == [(0, 0, 2, 0.25, 1.0), (0, 0, 3, 0.5, 0.3), (1, 2, 3, 0.25, 0.3)]


def test_subset_patients_is_seeded_nested_and_never_below_two():
    pool = [f"{i:03d}" for i in range(40)]
    quarter, half = subset_patients(pool, 0.25, seed=3), subset_patients(pool, 0.5, seed=3)
    assert len(quarter) == 10 and len(half) == 20 and set(quarter) <= set(half)
    assert quarter == subset_patients(reversed(pool), 0.25, seed=3)
    assert quarter != subset_patients(pool, 0.25, seed=4)
    assert len(subset_patients(pool[:3], 0.1, seed=0)) == 2
    with pytest.raises(ValueError):
        subset_patients(pool, 0.0, seed=0)


# ----------------------------------------------------------------------------- the protocol


@pytest.fixture(scope="module")
def blob_study(tmp_path_factory) -> StudyData:
    path = write_blob_dataset(tmp_path_factory.mktemp("blob") / "soul.h5", n_patients=16, image_size=32,
                              missing_prob=0.2)
    return load_study_data(path, path)


def test_a_mix_with_wrong_labels_measures_a_loss(blob_study):
    """Synthetic rows whose labels belong to other images, shifted 3 px (label noise), must make segmentation worse."""
    data = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"]))
    config = UsefulnessConfig(seeds=4, arms=("real_plus_synthetic",), low_data_fractions=(),
                              tasks=("segmentation",), **FAST)
    result = run_protocol(data, config, log=lambda _: None)
    (cmp,) = result["comparisons"]
    assert cmp["arm"] == "real_plus_synthetic" and cmp["baseline"] == "real_only"
    assert cmp["rule_verdict"] == "loss", cmp  # the paired rule; the gate may still withhold the claim
    real_dice = result["arms"]["real_only"]["tasks"]["segmentation"]["dice"]["mean"]
    assert real_dice > 0.6  # the downstream model learned the clean task (else a loss means nothing)


def _stage_effect_rows(n_patients: int, seed: int, size: int = 16) -> Rows:
    """Rows whose vessel density rises with the stage at a per-patient rate: responders (two in three)
    show a brighter background, so the response is visible in a visit's image, as reperfusion potential is."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels, pids, stages = [], [], [], []
    for p in range(n_patients):
        rate, phase = (0.08 if p % 3 else 0.0), rng.uniform(0, 6)
        for stage in sorted(rng.choice(6, size=3, replace=False)):
            for _ in range(2):
                label = (np.sin(0.9 * xx + 0.3 * yy + phase) > 0.6 - rate * stage).astype(np.uint8)
                image = np.clip((90 if rate else 40) + 150 * label + rng.normal(0, 12, label.shape), 0, 255).astype(np.uint8)
                images.append(image), labels.append(label), pids.append(f"{p:03d}"), stages.append(stage)
    n = len(images)
    return Rows(np.stack(images), np.stack(labels), np.asarray(pids), np.asarray(stages, np.int64), np.zeros(n, bool),
                np.ones(n, bool))


def test_result_holds_every_arm_task_seed_and_comparison_and_the_forecaster_learns():
    real = {"train": _stage_effect_rows(24, 0), "val": _stage_effect_rows(4, 1), "test": _stage_effect_rows(8, 2)}
    data = StudyData(real=real, synthetic_train=real["train"].where(np.zeros(len(real["train"]), bool)))
    config = UsefulnessConfig(seeds=2, arms=("real_only",), low_data_fractions=(),
                              segmenter=FAST["segmenter"], forecaster=ForecastRecipe(width=8, steps=600))
    result = run_protocol(data, config, log=lambda _: None)
    seg = result["arms"]["real_only"]["tasks"]["segmentation"]
    assert len(seg["dice"]["per_seed"]) == 2 and {"mean", "sd", "per_seed"} <= set(seg["cldice"])
    assert result["rule"].startswith("a difference is real") and result["comparisons"] == []
    resp = result["arms"]["real_only"]["tasks"]["response"]
    ref = result["references"]["response"]
    assert resp["n_eval_pairs"]["mean"] == ref["n_eval_pairs"] > 0
    # it forecasts each patient's response, better than "no change" and than the mean change per stage pair
    assert resp["mae"]["mean"] < 0.7 * ref["stage_mean_mae"] < 0.7 * ref["no_change_mae"]
    assert resp["corr"]["mean"] > 0.7


# ------------------------------------------------------------------- low-data isolation


class _FakeModel(BaseModel):
    checkpoint: str


class _FakeFill(BaseModel):
    synthetic_h5: str


class _FakeLabel(BaseModel):
    labels_h5: str


class _FakeScore(BaseModel):
    scores_csv: str


class _RecordingSteps:
    """Fake pipeline steps after the real subset 'preprocess': record the soul.h5 each trainer is handed; write
    minimal work files."""

    def __init__(self):
        self.trained_on: list[pd.DataFrame] = []

    def _train(self, ctx, preprocess):
        self.trained_on.append(read_meta(preprocess.path))
        return _FakeModel(checkpoint=str(ctx.run_dir / "fake.pt"))

    def _fill(self, ctx, preprocess, crgan):
        meta = read_meta(preprocess.path)
        rows = [{"patient_id": p, "stage": s, "subset": STAGE_NAMES[s], "split": g["split"].iloc[0],
                 "sample_index": 0, "sample_seed": 1}
                for p, g in meta.groupby("patient_id") for s in range(6) if s not in set(g["stage"])]
        size = read_arrays(preprocess.path, [0])[0].shape[-1]
        images = np.full((len(rows), size, size), 128, np.uint8)
        write_work_file(ctx.paths.synthetic_h5, {"images": images}, pd.DataFrame(rows))
        return _FakeFill(synthetic_h5=str(ctx.paths.synthetic_h5))

    def _label(self, ctx, fill, pix2pix):
        from storage.work_files import read_work_array
        images = read_work_array(fill.synthetic_h5, "images")
        write_work_file(ctx.paths.synthetic_labels_h5,
                        {"labels": (images > 200).astype(np.uint8), "label_confidence": np.ones(len(images))})
        return _FakeLabel(labels_h5=str(ctx.paths.synthetic_labels_h5))

    def _score(self, ctx, fill, label):
        from storage.work_files import read_work_table
        table = read_work_table(fill.synthetic_h5)
        pd.DataFrame({"patient_id": table["patient_id"], "accepted": True}).to_csv(ctx.paths.scores_csv, index=False)
        return _FakeScore(scores_csv=str(ctx.paths.scores_csv))

    def plan(self) -> tuple[Step, ...]:
        return (SUBSET_SOUL,
                Step("pix2pix", self._train, _FakeModel, needs=("preprocess",), reads=("soul_h5",)),
                Step("crgan", self._train, _FakeModel, needs=("preprocess",), reads=("soul_h5",)),
                Step("fill", self._fill, _FakeFill, needs=("preprocess", "crgan"), reads=("soul_h5",),
                     writes=("synthetic_h5",)),
                Step("label", self._label, _FakeLabel, needs=("fill", "pix2pix"), reads=("synthetic_h5",),
                     writes=("synthetic_labels_h5",)),
                Step("score", self._score, _FakeScore, needs=("fill", "label"),
                     reads=("synthetic_h5", "synthetic_labels_h5"), writes=("scores_csv",)))


def test_low_data_generator_and_labeller_see_only_the_subset(blob_study, tmp_path):
    from tasks.config import preset

    recorder = _RecordingSteps()
    maker = PipelineSubsetMaker(preset("tiny"), plan=recorder.plan())
    config = UsefulnessConfig(seeds=2, arms=(), low_data_fractions=(0.5,), tasks=("segmentation",), **FAST)
    result = run_protocol(blob_study, config, maker=maker, work_dir=tmp_path, log=lambda _: None)

    train_ids, val_ids = blob_study.real["train"].patients, blob_study.real["val"].patients
    test_ids = set(blob_study.real["test"].patients)
    assert len(recorder.trained_on) == 4  # labeller + generator, for each of 2 seeds
    for i, meta in enumerate(recorder.trained_on):
        subset = set(subset_patients(train_ids, 0.5, seed=i // 2))
        assert set(meta.loc[meta["split"] == "train", "patient_id"]) == subset
        assert set(meta.loc[meta["split"] != "train", "patient_id"]) <= set(val_ids)  # selection only
        assert not set(meta["patient_id"]) & test_ids
        assert not set(meta["patient_id"]) & (set(train_ids) - subset)
    arm = result["arms"]["low_data_50_real_plus_synthetic"]
    assert min(arm["n_synthetic_rows"]) > 0 and result["comparisons"][0]["baseline"] == "low_data_50_real"
    assert result["arms"]["low_data_50_real"]["n_patients"] == [len(train_ids) // 2] * 2


def test_a_split_too_small_for_a_low_data_subrun_skips_those_arms_with_a_warning(blob_study, tmp_path):
    """Five patients split 3/1/1 (the full preset's GPU test): a low-data sub-run needs two validation patients.
    The protocol must run the other arms and say why the low-data ones did not run, not fail the flow."""
    from tasks.rendering.report import render_report, warnings_of
    from tasks.analyses.usefulness_protocol import low_data_infeasible, render_markdown

    real = blob_study.real
    one_val = {"train": real["train"], "val": real["val"].of_patients(real["val"].patients[:1]), "test": real["test"]}
    called = []
    config = UsefulnessConfig(seeds=1, arms=("real_only",), low_data_fractions=(0.25, 0.5), tasks=("segmentation",),
                              **FAST)
    lines = []
    result = run_protocol(StudyData(real=one_val, synthetic_train=real["train"].where(np.zeros(len(real["train"]), bool)),
                                    soul_h5=Path("unused.h5")),
                          config, maker=lambda request: called.append(request), work_dir=tmp_path, log=lines.append)
    assert called == [] and list(result["arms"]) == ["real_only"]
    assert set(result["skipped_arms"]) == {"low_data_25", "low_data_50"}
    assert "only 1 validation patient(s)" in result["skipped_arms"]["low_data_25"]
    assert any("low_data_25 arms skipped" in line for line in lines)
    assert "**Skipped:** the low_data_50 arms: only 1 validation patient(s)" in render_markdown(result)
    warnings = warnings_of({"usefulness": result})
    assert any(w.startswith("usefulness: the low_data_25 arms were not run") for w in warnings)
    assert "the low_data_25 arms were not run" in render_report({"usefulness": result}, "phantom")
    assert low_data_infeasible(["a", "b"], ["v1", "v2"]).startswith("only 2 train patient(s)")
    assert low_data_infeasible(["a", "b", "c"], ["v1", "v2"]) is None


def test_a_maker_that_returns_outside_patients_is_refused(blob_study, tmp_path):
    def leaky(request: SubsetRequest) -> Rows:  # "synthetic" rows of every train patient
        r = blob_study.real["train"]
        return Rows(r.images, r.labels, r.patient_id, r.stage, np.ones(len(r), bool), r.accepted)

    config = UsefulnessConfig(seeds=1, arms=(), low_data_fractions=(0.25,), tasks=("segmentation",), **FAST)
    with pytest.raises(ValueError, match="outside the subset"):
        run_protocol(blob_study, config, maker=leaky, work_dir=tmp_path, log=lambda _: None)


def test_the_pipeline_steps_run_on_a_subset_subrun(tmp_path):
    """The adapter against the real step functions (tiny preset): synthetic rows of subset patients only."""
    from tasks.config import preset

    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=12, image_size=32, missing_prob=0.4)
    meta = read_meta(soul)
    train = sorted(meta.loc[meta["split"] == "train", "patient_id"].unique())
    val = sorted(meta.loc[meta["split"] == "val", "patient_id"].unique())
    request = SubsetRequest(soul_h5=soul, train_patients=tuple(train[:3]), selection_patients=tuple(val), seed=0,
                            work_dir=tmp_path / "sub")
    maker = PipelineSubsetMaker(preset("tiny"))
    rows = maker(request)
    assert maker.last_run.cached == []
    assert len(rows) > 0 and set(rows.patient_id) <= set(train[:3])
    assert rows.is_synthetic.all() and rows.images.shape[1:] == (32, 32) and set(np.unique(rows.labels)) <= {0, 1}
    again_maker = PipelineSubsetMaker(preset("tiny"))
    again = again_maker(request)
    assert np.array_equal(again.images, rows.images)
    # served from the sub-run's step records by the engine's rules: nothing retrained
    assert again_maker.last_run.cached == [step.name for step in SUBSET_PLAN]
    other = SubsetRequest(soul_h5=soul, train_patients=tuple(train[1:4]), selection_patients=tuple(val), seed=0,
                          work_dir=tmp_path / "sub")
    moved = again_maker(other)  # another subset in the same sub-run: its soul.h5 and everything after it recompute
    assert again_maker.last_run.cached == [] and set(moved.patient_id) <= set(train[1:4])


def test_verdict_lines_name_every_comparison():
    result = {"comparisons": [{"arm": "b", "baseline": "a", "task": "segmentation", "metric": "dice",
                               **paired_verdict([0.5, 0.5, 0.5], [0.6, 0.61, 0.62], True)}],
              "arms": {"a": {"tasks": {"segmentation": {"dice": {"mean": 0.5}}}},
                       "b": {"tasks": {"segmentation": {"dice": {"mean": 0.61}}}}}}
    (line,) = verdict_lines(result)
    assert "b vs a" in line and line.endswith("gain")


def test_report_and_card_render_the_protocol_table_and_verdicts():
    from tasks.rendering.report import render_card, render_report

    gain = paired_verdict([0.60, 0.61, 0.62], [0.64, 0.65, 0.66], True)
    arm = lambda v: {"n_rows": [10] * 3, "n_synthetic_rows": [0] * 3, "n_patients": [4] * 3,  # noqa: E731
                     "tasks": {"segmentation": {"dice": {"mean": v, "sd": 0.01, "per_seed": [v] * 3},
                                                "cldice": {"mean": v, "sd": 0.01, "per_seed": [v] * 3}}}}
    use = {"rule": "a difference is real when ...", "eval_split": "test", "seeds": [0, 1, 2],
           "arms": {"low_data_25_real": arm(0.61), "low_data_25_real_plus_synthetic": arm(0.65)},
           "comparisons": [{"arm": "low_data_25_real_plus_synthetic", "baseline": "low_data_25_real",
                            "task": "segmentation", "metric": "dice", **gain}], "references": {}}
    use["verdicts"] = verdict_lines(use)
    report = {"usefulness": use}
    text = render_report(report, "phantom")
    assert "| low_data_25_real_plus_synthetic | 10 (0) | 4 | 0.6500 +- 0.0100 |" in text
    assert "| low_data_25_real_plus_synthetic vs low_data_25_real | segmentation (dice) | +0.0400 |" in text
    assert "**gain**" in text
    card = render_card(report, {}, "phantom")
    assert "| low_data_25_real_plus_synthetic vs low_data_25_real | segmentation (dice) | +0.0400 |" in card
    assert "Helped by the declared rule: low_data_25_real_plus_synthetic on segmentation (dice +0.0400" in card


# ------------------------------------------------------------------ the bar and the advice


def _comparison(arm: str, task: str, baseline_values, arm_values, higher=True) -> dict:
    metric = "dice" if task == "segmentation" else "mae"
    baseline = "real_only" if arm in ("real_plus_synthetic", "synthetic_only") else arm.replace("_plus_synthetic", "")
    return {"arm": arm, "baseline": baseline,
            "task": task, "metric": metric, **paired_verdict(baseline_values, arm_values, higher)}


GAIN = ([0.60, 0.61, 0.62], [0.64, 0.651, 0.659])
LOSS = ([0.60, 0.61, 0.62], [0.55, 0.561, 0.569])
NOISE = ([0.60, 0.61, 0.62], [0.61, 0.60, 0.62])


MEASURABLE = {"measurable": True, "patients": 9, "reason": "real-only still improves (constructed)"}


def _measurable(c: dict, role: str = "real_only") -> dict:
    """A comparison in an arm the learning-curve gate calls measurable, against a baseline of ``role``."""
    return gated({**c, "baseline_role": role, "group": c["arm"], "adds_synthetic": c["arm"] != "synthetic_only"},
                 MEASURABLE if c["arm"] != "synthetic_only" else None)


@pytest.mark.parametrize("verdicts, expected", [
    ((GAIN, NOISE), True),           # one mix gains over real-only and the alternative, none loses
    ((GAIN, LOSS), False),           # a gain does not excuse a loss elsewhere
    ((NOISE, NOISE), False),         # no difference the rule can call real is not help
])
def test_the_bar_follows_the_declared_rule_on_constructed_numbers(verdicts, expected):
    first, second = verdicts
    mix = _comparison("low_data_25_real_plus_synthetic", "segmentation", *first)
    result = {"comparisons": [_measurable(mix), _measurable(mix, "same_information_alternative"),
                              _measurable(_comparison("real_plus_synthetic", "segmentation", *second))]}
    assert rows_help(result) is expected


def test_synthetic_only_is_context_not_the_bar_and_no_mix_means_no_bar():
    mix = _comparison("real_plus_synthetic", "segmentation", *GAIN)
    result = {"comparisons": [_measurable(_comparison("synthetic_only", "segmentation", *LOSS)), _measurable(mix),
                              _measurable(mix, "same_information_alternative")]}
    assert rows_help(result) is True
    assert rows_help({"comparisons": [_comparison("synthetic_only", "segmentation", *LOSS)]}) is None
    from tasks.rendering.report import bar_checks

    assert "synthetic_rows_help" not in bar_checks({"usefulness": {"comparisons": []}})


def test_advice_names_the_mix_that_helped_its_gain_and_settings_or_says_none_did():
    config = {"synthetic_filter": "accepted", "synthetic_labels": "segmenter", "synthetic_weight": 0.5}
    helped = {"config": config, "comparisons": [_comparison("low_data_25_real_plus_synthetic", "segmentation", *GAIN)]}
    text = usage_advice(helped)
    assert "Helped by the declared rule: low_data_25_real_plus_synthetic on segmentation (dice +0.0400" in text
    assert "relabelled by a supervised segmenter" in text and "loss weight 0.5" in text
    # an error metric: the same numbers lower the MAE, a gain
    lower_mae = {"config": config, "comparisons": [_comparison("real_plus_synthetic", "response", *LOSS, higher=False)]}
    assert "Helped by the declared rule: real_plus_synthetic on response" in usage_advice(lower_mae)
    text = usage_advice({"config": config, "comparisons": [_comparison("real_plus_synthetic", "segmentation", *LOSS)]})
    assert "Hurt by the declared rule: real_plus_synthetic" in text and "No mix helped" in text


def test_a_missed_usefulness_bar_is_a_warning_in_report_and_card():
    from tasks.rendering.report import bar_checks, render_card, render_report, warnings_of

    arm = lambda v: {"n_rows": [10] * 3, "n_synthetic_rows": [0] * 3, "n_patients": [4] * 3,  # noqa: E731
                     "tasks": {"segmentation": {"dice": {"mean": v, "sd": 0.01, "per_seed": [v] * 3},
                                                "cldice": {"mean": v, "sd": 0.01, "per_seed": [v] * 3}}}}
    use = {"rule": "a difference is real when ...", "eval_split": "test", "seeds": [0, 1, 2],
           "config": {"arms": ["real_only", "real_plus_synthetic"], "low_data_fractions": []},
           "arms": {"real_only": arm(0.61), "real_plus_synthetic": arm(0.56)},
           "comparisons": [_measurable(_comparison("real_plus_synthetic", "segmentation", *LOSS))], "references": {}}
    report = {"usefulness": use}
    assert bar_checks(report) == {"synthetic_rows_help": False}
    (warning,) = warnings_of(report)
    assert warning.startswith("quality bar not met: synthetic_rows_help")
    for doc in (render_report(report, "phantom"), render_card(report, {}, "phantom")):
        assert f"> **WARNING** {warning}" in doc
        assert "| real_plus_synthetic vs real_only | segmentation (dice) | -0.0500 |" in doc
        assert "**loss**" in doc and "No mix helped" in doc
        assert "Not run here (budget): synthetic_only, low-data arms" in doc


def test_the_relabeller_of_a_low_data_arm_sees_only_the_subset(blob_study, tmp_path, monkeypatch):
    import tasks.analyses.usefulness_protocol as usefulness
    from tasks.config import preset

    seen = []

    class ZeroLabels:
        def labels(self, images):
            return np.zeros(np.shape(images), np.uint8)

    def recording_relabeller(real, val, config, seed, device="auto"):
        seen.append((set(real.patients), set(val.patients), bool(real.is_synthetic.any())))
        return ZeroLabels()

    monkeypatch.setattr(usefulness, "fit_relabeller", recording_relabeller)
    maker = PipelineSubsetMaker(preset("tiny"), plan=_RecordingSteps().plan())
    config = UsefulnessConfig(seeds=1, arms=(), low_data_fractions=(0.5,), tasks=("segmentation",),
                              synthetic_labels="segmenter", **FAST)
    result = run_protocol(blob_study, config, maker=maker, work_dir=tmp_path, log=lambda _: None)
    subset = set(subset_patients(blob_study.real["train"].patients, 0.5, seed=0))
    assert seen == [(subset, set(blob_study.real["val"].patients), False)]
    arm = result["arms"]["low_data_50_real_plus_synthetic"]
    assert arm["n_synthetic_rows"][0] > 0 and result["config"]["synthetic_labels"] == "segmenter"


class _TruthLookup:
    """A relabeller that knows the true label of each image (by its bytes): isolates the selection rule."""

    def __init__(self, rows: Rows):
        self.truth = {img.tobytes(): lab for img, lab in zip(rows.images, rows.labels)}

    def labels(self, images):
        return np.stack([self.truth[img.tobytes()] for img in images]).astype(np.uint8)


def test_agreement_keeps_rows_whose_label_agrees_and_drops_wrong_labels(blob_study):
    from tasks.analyses.usefulness_protocol import select_by_agreement

    real = Rows.concat(blob_study.real["train"], blob_study.real["val"])
    right = blob_study.real["train"]
    right = Rows(right.images, right.labels, right.patient_id, right.stage, np.ones(len(right), bool),
                 np.ones(len(right), bool))
    wrong = wrongly_labelled_copies(blob_study.real["train"])
    kept, info = select_by_agreement(Rows.concat(right, wrong), _TruthLookup(real), blob_study.real["val"])
    # the relabeller matches the annotations exactly on val, so the bar is Dice 1: only right labels pass
    assert info == {"tau": 1.0, "kept": len(right), "of": len(right) + len(wrong)}
    np.testing.assert_array_equal(kept.labels, right.labels)
    empty, info = select_by_agreement(wrong.where(np.zeros(len(wrong), bool)), _TruthLookup(real),
                                      blob_study.real["val"])
    assert len(empty) == 0 and info["kept"] == 0
    no_val = blob_study.real["val"].where(np.zeros(len(blob_study.real["val"]), bool))
    with pytest.raises(ValueError, match="validation rows"):
        select_by_agreement(right, _TruthLookup(real), no_val)


def test_agreement_filter_in_a_mix_removes_the_harm_of_wrong_labels(blob_study):
    """The mix with wrong labels that measures a loss (above) measures none once rows are selected by agreement:
    a trained relabeller disagrees with the wrong labels, and its bar comes from the validation rows."""
    data = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"]))
    config = UsefulnessConfig(seeds=3, arms=("real_plus_synthetic",), low_data_fractions=(),
                              tasks=("segmentation",), synthetic_filter="agreement", **FAST)
    result = run_protocol(data, config, log=lambda _: None)
    selection = result["agreement_selection"]["full_data"]
    assert selection["of"] == len(data.synthetic_train) and selection["kept"] < 0.2 * selection["of"], selection
    (cmp,) = result["comparisons"]
    assert cmp["rule_verdict"] != "loss", cmp
    assert "agrees with a supervised segmenter" in mix_settings(result)
    assert (f"Agreement selection (full_data): kept {selection['kept']} of {selection['of']} synthetic rows"
            in render_markdown(result))


def test_row_weights_keep_down_weighted_wrong_labels_from_hurting(blob_study):
    """Synthetic rows with wrong labels at weight 1e-6 are (almost) never drawn: no loss is measured."""
    data = StudyData(real=blob_study.real, synthetic_train=wrongly_labelled_copies(blob_study.real["train"]))
    config = UsefulnessConfig(seeds=3, arms=("real_plus_synthetic",), low_data_fractions=(),
                              tasks=("segmentation",), synthetic_weight=1e-6, **FAST)
    (cmp,) = run_protocol(data, config, log=lambda _: None)["comparisons"]
    assert cmp["rule_verdict"] != "loss" and abs(cmp["mean_gain"]) < 0.02, cmp


def test_fit_segmenter_refuses_bad_row_weights():
    from brvo_models.segmenter import fit_segmenter

    x, y = np.zeros((4, 32, 32), np.uint8), np.zeros((4, 32, 32), np.uint8)
    for bad in ([1, 1, 1], [1, -1, 1, 1], [0, 0, 0, 0], [1, np.nan, 1, 1]):
        with pytest.raises(ValueError, match="row_weights"):
            fit_segmenter(x, y, image_size=32, steps=1, row_weights=np.asarray(bad, float), device="cpu")


def test_a_one_seed_result_read_back_from_a_step_record_renders():
    """One seed has no SE: a step record stores the NaNs as null, and a rerun served from it must still render."""
    from tasks.rendering.report import render_card, render_report
    from tasks.analyses.usefulness_protocol import render_markdown

    arm = lambda v: {"n_rows": [10], "n_synthetic_rows": [0], "n_patients": [4],  # noqa: E731
                     "tasks": {"segmentation": {"dice": {"mean": v, "sd": 0.0, "per_seed": [v]},
                                                "cldice": {"mean": None, "sd": None, "per_seed": [None]}}}}
    cmp = {"arm": "real_plus_synthetic", "baseline": "real_only", "task": "segmentation", "metric": "dice",
           **paired_verdict([0.6], [0.7], True)}
    cmp = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in cmp.items()}
    use = {"rule": "r", "eval_split": "test", "seeds": [0], "arms": {"real_only": arm(0.6),
           "real_plus_synthetic": arm(0.7)}, "comparisons": [cmp], "references": {}}
    table = render_markdown(use)
    assert "| real_plus_synthetic vs real_only | segmentation (dice) | +0.1000 | n/a | n/a SE | " \
           "**not enough seeds** |" in table
    assert "| real_only | 10 (0) | 4 | 0.6000 +- 0.0000 | n/a +- n/a |" in table
    assert "n/a" in render_report({"usefulness": use}, "phantom") and "n/a" in render_card({"usefulness": use}, {}, "x")
