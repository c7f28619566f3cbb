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

    seen_by_segmenter = []
    original_fit = pix2pix_module.fit_segmenter

    def spy(images, labels, **kwargs):
        seen_by_segmenter.append(len(images))
        return original_fit(images, labels, **kwargs)

    pix2pix_module.fit_segmenter = spy
    try:
        result = pix2pix_module.train_pix2pix(tmp_path / "run", config, log=lambda *_: None, soul_h5=soul)
        pix2pix_module.evaluate_pix2pix(tmp_path / "run", config, log=lambda *_: None, soul_h5=soul)
    finally:
        pix2pix_module.fit_segmenter = original_fit
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
