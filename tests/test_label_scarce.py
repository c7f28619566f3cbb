"""Scarce labels, not scarce patients: the labelled-patients config, its cache identity, and the study's arms."""
from __future__ import annotations

import numpy as np
import pytest

from brvo_models.configs import SegmenterRecipe, UsefulnessConfig
from storage.errors import BrvoError
from storage.paired_format import read_meta
from tasks.analyses.usefulness_protocol import Rows, load_study_data
from tests.conftest import write_blob_dataset


def _train_and_val(soul):
    meta = read_meta(soul)
    real = meta[~meta["is_synthetic"].astype(bool)]
    train = sorted(real.loc[real["split"] == "train", "patient_id"].astype(str).unique())
    val = sorted(real.loc[real["split"] == "val", "patient_id"].astype(str).unique())
    return real, train, val


# --------------------------------------------------------------------------- the product's config field


@pytest.mark.slow
def test_pix2pix_trains_on_labelled_patients_only_and_crgan_on_every_train_image(tmp_path):
    """The step functions themselves (tiny preset): Pix2Pix and its segmenter baseline see the labelled train
    patients' rows and no other train patient's; CRGAN trains on every train patient."""
    import tasks.pix2pix as pix2pix_module
    from tasks.config import preset
    from tasks.crgan import load_sequences

    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=10, image_size=32, missing_prob=0.3)
    real, train, _ = _train_and_val(soul)
    labelled = tuple(train[:2])
    config = preset("tiny").with_overrides(labelled_train_patients=labelled)
    images, labels, meta = pix2pix_module.load_split(soul, ("train",), config.labelled_train_patients)
    assert set(meta["patient_id"].astype(str)) == set(labelled)
    n_labelled = int(real["patient_id"].astype(str).isin(labelled).sum())
    assert len(images) == len(labels) == n_labelled

    import tasks.shared.label_baselines as baselines_module

    seen_by_segmenter = []
    original_fit = baselines_module.fit_segmenter

    def spy(images, labels, **kwargs):
        seen_by_segmenter.append(len(images))
        return original_fit(images, labels, **kwargs)

    baselines_module.fit_segmenter = spy
    try:
        result = pix2pix_module.train_pix2pix(tmp_path / "run", config, log=lambda *_: None, soul_h5=soul)
        pix2pix_module.evaluate_pix2pix(tmp_path / "run", config, log=lambda *_: None, soul_h5=soul)
    finally:
        baselines_module.fit_segmenter = original_fit
    assert result.n_train == n_labelled < int((real["split"] == "train").sum())
    assert seen_by_segmenter == [n_labelled]
    crgan_train = {s.patient_id for s in load_sequences(soul) if s.split == "train"}
    assert crgan_train == set(train)


def test_labelled_patients_outside_the_train_split_are_a_one_line_error(tmp_path):
    from tasks.config import preset
    from tasks.pix2pix import preflight_train_pix2pix

    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=10, image_size=32)
    _, train, val = _train_and_val(soul)
    config = preset("tiny").with_overrides(labelled_train_patients=(train[0], val[0]))
    with pytest.raises(BrvoError, match=f"not in the train split.*{val[0]}") as err:
        preflight_train_pix2pix(tmp_path / "run", config, soul)
    assert "\n" not in str(err.value)
    with pytest.raises(BrvoError, match="labelled_train_patients"):
        preset("tiny").with_overrides(labelled_train_patients=())


def test_the_labelled_patients_are_part_of_pix2pix_identity_and_not_of_crgans(tmp_path):
    """Changing which patients are labelled recomputes Pix2Pix (and what reads it), never CRGAN."""
    from tasks.config import preset
    from tasks.crgan import TRAIN_CRGAN
    from tasks.engine import StepContext
    from tasks.engine.records import StepRecord, step_key
    from tasks.pix2pix import TRAIN_PIX2PIX

    upstream = {"preprocess": StepRecord.model_construct(key="k", outputs={})}
    keys = {}
    for labelled in (None, ("001",), ("001", "002")):
        ctx = StepContext(run_dir=tmp_path, config=preset("tiny").with_overrides(labelled_train_patients=labelled)
                          if labelled else preset("tiny"), source=None, log=lambda *_: None)
        keys[labelled] = (step_key(TRAIN_PIX2PIX, ctx, upstream), step_key(TRAIN_CRGAN, ctx, upstream))
    pix_keys = {k[0] for k in keys.values()}
    crgan_keys = {k[1] for k in keys.values()}
    assert len(pix_keys) == 3 and len(crgan_keys) == 1


# ------------------------------------------------------------------------------------------- the study


@pytest.fixture(scope="module")
def blob_study(tmp_path_factory):
    path = write_blob_dataset(tmp_path_factory.mktemp("blob") / "soul.h5", n_patients=16, image_size=32,
                              missing_prob=0.2)
    return load_study_data(path, path)


def test_labelled_patients_are_seeded_nested_and_at_least_one():
    from tasks.analyses.label_scarce import labelled_patients

    pool = [f"{i:03d}" for i in range(37)]
    ten, quarter = labelled_patients(pool, 0.1, seed=2), labelled_patients(pool, 0.25, seed=2)
    assert len(ten) == 4 and len(quarter) == 9 and set(ten) <= set(quarter)
    assert ten == labelled_patients(reversed(pool), 0.1, seed=2) and ten != labelled_patients(pool, 0.1, seed=3)
    assert len(labelled_patients(pool[:3], 0.1, seed=0)) == 1


class FakeMaker:
    """Synthetic rows = the train patients' real images shifted 1 px, half of them not accepted; pseudo-labels =
    the unlabelled patients' images with their annotations flipped left-right (so a test can tell them apart)."""

    def __init__(self, real_train: Rows):
        self.real_train = real_train
        self.calls = []

    def __call__(self, labelled, seed):
        from tasks.analyses.label_scarce import LabelScarceRows

        self.calls.append((tuple(labelled), seed))
        r = self.real_train
        n = len(r)
        synthetic = Rows(np.roll(r.images, 1, axis=2), r.labels, r.patient_id, r.stage, np.ones(n, bool),
                         np.arange(n) % 2 == 0)
        unlabelled = r.where(~np.isin(r.patient_id, list(labelled)))
        pseudo = Rows(unlabelled.images, unlabelled.labels[:, :, ::-1].copy(), unlabelled.patient_id,
                      unlabelled.stage, unlabelled.is_synthetic, unlabelled.accepted)
        return LabelScarceRows(synthetic, pseudo, int(np.isin(r.patient_id, list(labelled)).sum()),
                               len(r.patients))


def test_the_arms_hold_what_their_names_say(blob_study):
    from tasks.analyses.label_scarce import (
        LABELLED_ONLY, PLUS_BOTH, PLUS_PSEUDO, PLUS_SYNTHETIC, REPEATED, arm_rows, labelled_patients)

    train = blob_study.real["train"]
    labelled = labelled_patients(train.patients, 0.25, seed=0)
    made = FakeMaker(train)(labelled, 0)
    arms = arm_rows(train, labelled, made, seed=0)
    only = arms[LABELLED_ONLY]
    assert set(only.patients) == set(labelled) and not only.is_synthetic.any()
    pseudo = arms[PLUS_PSEUDO]
    assert len(pseudo) == len(train) and not pseudo.is_synthetic.any()
    accepted = int(made.synthetic.accepted.sum())
    assert len(arms[PLUS_SYNTHETIC]) == len(only) + accepted and arms[PLUS_SYNTHETIC].accepted.all()
    assert len(arms[PLUS_BOTH]) == len(train) + accepted
    repeated = arms[REPEATED]
    assert len(repeated) == len(arms[PLUS_SYNTHETIC]) and set(repeated.patients) == set(labelled)
    times = {}
    for image in repeated.images:
        times[image.tobytes()] = times.get(image.tobytes(), 0) + 1
    whole = len(repeated) // len(only)
    assert {image.tobytes() for image in only.images} == set(times)  # every labelled row, no other row
    assert set(times.values()) <= {whole, whole + 1}  # as evenly as the count allows


@pytest.mark.slow
def test_the_study_compares_paired_by_seed_with_the_baselines_role(blob_study, tmp_path):
    from tasks.analyses import label_scarce as ls

    config = UsefulnessConfig(seeds=2, tasks=("segmentation",),
                              segmenter=SegmenterRecipe(width=8, steps=20, batch_size=8, validations=2, crop=None))
    maker = FakeMaker(blob_study.real["train"])
    original = ls.BUDGETS
    ls.BUDGETS = (20,)  # budget_recipe reads it: keep the test fast
    try:
        parts = [ls.measure_seeds(blob_study, config, [0.25], maker, [s], log=lambda _: None) for s in (1, 0)]
    finally:
        ls.BUDGETS = original
    result = ls.judge(ls.merge_measured(parts), config)
    assert [c[1] for c in maker.calls] == [1, 0]
    assert result["seeds"] == [0, 1]
    assert set(result["arms"]) == {f"labels_25_{a}" for a in ls.ARMS}
    assert all(len(a["dice"]) == 2 for a in result["arms"].values())
    roles = {(c["arm"], c["baseline"]): c["baseline_role"] for c in result["comparisons"] if c["primary"]}
    assert roles[("labels_25_plus_synthetic", "labels_25_plus_pseudo_labels")] == "same_information_alternative"
    assert roles[("labels_25_plus_synthetic", "labels_25_labelled_only")] == "real_only"
    for c in result["comparisons"]:
        assert {"arm", "baseline", "task", "metric", "mean_gain", "se", "t_crit", "n", "verdict"} <= set(c)
        assert c["n"] == 2
    assert "labels_25 " not in ls.render_markdown(result) and "plus_pseudo_labels" in ls.render_markdown(result)
    with pytest.raises(ValueError, match="measured twice"):
        ls.merge_measured(parts + parts[:1])


@pytest.mark.slow
def test_the_pipeline_sub_run_labels_with_the_labelled_patients_only(tmp_path):
    """The maker against the real steps (tiny preset): Pix2Pix saw the labelled rows, CRGAN every train patient,
    no test patient is in the sub-run, and a second labelled set in the same seed's sub-run reuses CRGAN."""
    from tasks.analyses.label_scarce import PipelineLabelScarceMaker
    from tasks.config import preset

    soul = write_blob_dataset(tmp_path / "soul.h5", n_patients=12, image_size=32, missing_prob=0.4)
    real, train, val = _train_and_val(soul)
    maker = PipelineLabelScarceMaker(preset("tiny"), soul, train, val, tmp_path / "work")
    made = maker(train[:1], seed=0)
    assert made.pix2pix_train_rows == int(real["patient_id"].isin(train[:1]).sum())
    assert made.crgan_train_patients == len(train)
    assert set(made.pseudo_labelled.patient_id) == set(train[1:])
    assert set(made.synthetic.patient_id) <= set(train) and len(made.synthetic) > 0
    sub_soul = read_meta(tmp_path / "work" / "seed0" / "soul.h5")
    test_ids = set(real.loc[real["split"] == "test", "patient_id"])
    assert not set(sub_soul["patient_id"]) & test_ids
    again = PipelineLabelScarceMaker(preset("tiny"), soul, train, val, tmp_path / "work")
    again(train[:2], seed=0)
    assert {"preprocess", "crgan", "fill"} <= set(again.last_run.cached)
    assert not {"pix2pix", "label", "score"} & set(again.last_run.cached)


def test_an_unfinished_study_pairs_the_seeds_both_arms_have_and_names_what_is_missing():
    from tasks.analyses.label_scarce import judge, render_markdown

    def arm(name, dice):
        return {"fraction": 0.1, "arm": name, "per_seed": {
            str(s): {"n_rows": 10, "n_synthetic_rows": 0, "n_pseudo_rows": 0, "n_patients": 1, "budget_step": 300,
                     "dice": d, "cldice": d} for s, d in dice.items()}}

    measured = {"arms": {"labels_10_labelled_only": arm("labelled_only", {0: 0.60, 1: 0.61, 2: 0.62}),
                         "labels_10_plus_pseudo_labels": arm("plus_pseudo_labels", {2: 0.70, 0: 0.68})},
                "subruns": {}}
    result = judge(measured, UsefulnessConfig())
    [dice] = [c for c in result["comparisons"] if c["primary"]]
    assert dice["arm"] == "labels_10_plus_pseudo_labels" and dice["seeds"] == [0, 2] and dice["n"] == 2
    assert dice["per_seed_gain"] == pytest.approx([0.08, 0.08])
    assert "labels_10_plus_synthetic vs labels_10_plus_pseudo_labels" in result["not_measured"]
    assert "Not measured (the study did not finish)" in render_markdown(result)


def test_the_gate_withholds_the_label_scarce_verdicts_where_the_labelled_curve_is_flat():
    """A loss (or gain) against the labelled rows alone is only claimed where all the labels beat the arm's share
    by the rule; elsewhere the verdict is 'not measurable here', the rule's own kept beside it."""
    from tasks.analyses.label_scarce import apply_gate
    from tasks.analyses.usefulness_protocol import judge_gate

    comparison = {"arm": "labels_10_plus_synthetic", "baseline": "labels_10_labelled_only", "baseline_role": "real_only",
                  "task": "segmentation", "metric": "dice", "primary": True, "fraction": 0.1, "seeds": [0, 1, 2],
                  "per_seed_gain": [-0.04, -0.05, -0.045], "mean_gain": -0.045, "se": 0.003, "t_crit": 4.3, "n": 3,
                  "verdict": "loss"}
    result = {"comparisons": [comparison], "fractions": [0.1]}
    flat = {0.1: {"patients": [4] * 3, "segmentation": [0.670, 0.672, 0.671]},
            0.2: {"patients": [7] * 3, "segmentation": [0.671, 0.670, 0.672]},
            1.0: {"patients": [37] * 3, "segmentation": [0.671, 0.671, 0.670]}}
    rising = {f: {**p, "segmentation": [v + (0.05 if f == 1.0 else 0.0) + 0.001 * i
                                        for i, v in enumerate(p["segmentation"])]} for f, p in flat.items()}
    withheld = apply_gate(result, judge_gate(flat, {"labels_10": 0.1}, ["segmentation"]))["comparisons"][0]
    assert withheld["verdict"].startswith("not measurable here: real-only is saturated at 4 patients")
    assert withheld["rule_verdict"] == "loss"
    claimed = apply_gate(result, judge_gate(rising, {"labels_10": 0.1}, ["segmentation"]))["comparisons"][0]
    assert claimed["verdict"] == "loss" and claimed["gate"]["measurable"] is True
