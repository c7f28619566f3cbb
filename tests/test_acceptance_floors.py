"""Acceptance has absolute floors: a degenerate synthetic label is never accepted, whatever the thresholds
calibrated on the model's own labels say, and the reason is visible in scores.csv, report.json, the report
and the card."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import write_blob_dataset
from storage.run_dir import RunPaths
from storage.work_files import write_work_file
from tasks.config import preset
from tasks.score import accept_mask, calibrate_thresholds

SIZE = 32


def _all_vessel_scores(n: int, seed: int) -> pd.DataFrame:
    """What a failed Pix2Pix gives: every label all vessel (density 1.0), so every density_z is huge and alike."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"consistency_ssim": rng.uniform(0.5, 0.9, n), "realism": rng.uniform(0.5, 0.6, n),
                         "density_z": rng.normal(73.0, 0.3, n), "label_confidence": np.full(n, 0.99),
                         "label_density": np.ones(n)})


def test_all_vessel_labels_are_rejected_under_thresholds_calibrated_on_all_vessel_real_labels():
    from tasks.score import rejection_reasons

    cfg = preset("demo")
    calibrated = calibrate_thresholds(_all_vessel_scores(200, 0), cfg, split="val", patients=8)
    assert calibrated.max_abs_density_z > 70  # the calibration itself is fooled, as in the failed run
    synthetic = _all_vessel_scores(38, 1)
    assert not accept_mask(synthetic, calibrated).any()
    assert all("all-vessel" in reason for reason in rejection_reasons(synthetic, calibrated))
    assert not accept_mask(synthetic.assign(label_density=0.0), calibrated).any()  # empty labels too


# ----------------------------------------------------------------------------- the score step, end to end


@pytest.fixture
def failed_labeller_run(tmp_path, monkeypatch):
    """A run directory at the score step: blob annotations in soul.h5, one synthetic image per missing stage,
    and models stubbed out: the discriminator finds every image real, and Pix2Pix labels every real image all
    vessel (so thresholds are calibrated on all-vessel labels). Returns (run_dir, synthetic labels writer)."""
    import brvo_models.crgan as crgan
    import brvo_models.crgan_sampling as crgan_sampling
    import brvo_models.pix2pix as pix2pix
    from storage.paired_format import read_arrays, read_meta
    from tasks.fill import missing_stages

    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths.of(run)
    write_blob_dataset(paths.soul_h5, n_patients=10, image_size=SIZE, seed=1)
    meta = read_meta(paths.soul_h5)
    images, _ = read_arrays(paths.soul_h5)
    rows = [(pid, stage) for pid, stages in missing_stages(meta).items() for stage in stages]
    first_image = {pid: images[np.flatnonzero(meta["patient_id"].to_numpy() == pid)[0]] for pid, _ in rows}
    table = pd.DataFrame({"patient_id": [p for p, _ in rows], "stage": [s for _, s in rows],
                          "subset": "", "split": [meta.loc[meta["patient_id"] == p, "split"].iloc[0] for p, _ in rows],
                          "sample_index": 0, "sample_seed": 0})
    write_work_file(paths.synthetic_h5, {"images": np.stack([first_image[p] for p, _ in rows])}, table)

    monkeypatch.setattr(crgan, "load_discriminator", lambda *a, **k: (None, {}, "cpu"))
    monkeypatch.setattr(crgan_sampling, "realism", lambda _d, imgs, *a, **k: np.full(len(imgs), 0.9, np.float32))
    monkeypatch.setattr(pix2pix, "load_labeller", lambda *a, **k: (None, "cpu"))
    monkeypatch.setattr(pix2pix, "label_images", lambda _g, imgs, **k: (
        np.full(imgs.shape, 0.99, np.float32), np.ones(imgs.shape, np.uint8)))

    def write_labels(labels: np.ndarray) -> None:
        write_work_file(paths.synthetic_labels_h5, {"labels": labels.astype(np.uint8),
                                                    "label_confidence": np.full(len(labels), 0.99, np.float32)})

    return run, len(rows), write_labels


def test_a_failed_labeller_gets_nothing_accepted_and_scores_csv_says_why(failed_labeller_run):
    from tasks.score import score_samples

    run, n, write_labels = failed_labeller_run
    write_labels(np.ones((n, SIZE, SIZE)))
    cfg = preset("tiny").with_overrides(device="cpu", image_size=SIZE)
    result = score_samples(run, cfg, run / "crgan.pt", run / "pix2pix.pt", log=lambda *_: None)
    assert result.thresholds.source == "calibrated"  # the bounds came from the all-vessel real labels
    scores = pd.read_csv(result.scores_csv, dtype={"patient_id": str}, keep_default_na=False)
    assert result.n_accepted == 0 and not scores["accepted"].any()
    assert (scores["label_density"] == 1.0).all()
    assert scores["rejection"].str.contains("all-vessel").all()


def test_the_label_density_range_is_the_train_annotations_not_the_models_labels(failed_labeller_run):
    from storage.paired_format import read_arrays, read_meta
    from tasks.score import score_samples

    run, n, write_labels = failed_labeller_run
    paths = RunPaths.of(run)
    meta = read_meta(paths.soul_h5)
    _, annotations = read_arrays(paths.soul_h5)
    density = annotations.reshape(len(annotations), -1).mean(axis=1)
    train = density[meta["split"].to_numpy() == "train"]
    plausible = annotations[int(np.argmin(np.abs(density - np.median(train))))]
    above = np.zeros((SIZE, SIZE), np.uint8)
    above.ravel()[: int(np.ceil((train.max() + 0.05) * SIZE * SIZE))] = 1  # denser than any train annotation
    labels = np.stack([plausible] * n)
    labels[0], labels[1], labels[2] = 0, 1, above
    write_labels(labels)
    cfg = preset("tiny").with_overrides(device="cpu", image_size=SIZE, acceptance="fixed")
    result = score_samples(run, cfg, run / "crgan.pt", run / "pix2pix.pt", log=lambda *_: None)
    t = result.thresholds
    assert (t.min_label_density, t.max_label_density) == pytest.approx((train.min(), train.max()))
    scores = pd.read_csv(result.scores_csv, dtype={"patient_id": str}, keep_default_na=False)
    assert "empty" in scores["rejection"][0] and "all-vessel" in scores["rejection"][1]
    assert "above the training annotations" in scores["rejection"][2]
    assert not scores["accepted"][:3].any()
    assert not scores["rejection"][3:].str.contains("label_density").any()  # an annotation-like label passes
    assert "label_density" in t.rules() and "train" in t.label_density_source


# ----------------------------------------------------------------------------- report, card, log


def _synthetic_section(n: int, degenerate: int):
    from tasks.export import synthetic_section
    from tasks.score import AcceptanceThresholds

    thresholds = AcceptanceThresholds.from_config(preset("demo")).model_copy(
        update={"min_label_density": 0.05, "max_label_density": 0.4, "label_density_source": "30 train annotations"})
    meta = pd.DataFrame({"patient_id": "1", "stage": 1, "is_synthetic": True, "accepted": False,
                         "consistency_ssim": np.full(n, 0.9), "realism": 0.5, "density_z": 0.0,
                         "label_confidence": 0.99}, index=range(n))
    density = np.full(n, 0.2)
    density[:degenerate] = 1.0
    return synthetic_section(meta, thresholds, density)


def test_report_counts_degenerate_labels_by_reason_and_warns_when_the_labeller_failed():
    from tasks.rendering.report import render_card, render_report, warnings_of

    section = _synthetic_section(38, 38)
    assert section["degenerate_labels"] == 38 and section["rejected_by"]["label_density"] == 38
    assert section["degenerate_by"] == {"all-vessel label": 38}
    report = {"synthetic": {**section, "per_stage": {}}}
    (warning,) = [w for w in warnings_of(report) if "degenerate" in w]
    assert "38 of 38 synthetic labels are degenerate" in warning and "labeller failed" in warning
    text, card = render_report(report, "phantom"), render_card(report, {}, "phantom")
    assert f"> **WARNING** {warning}" in text and f"> **WARNING** {warning}" in card
    assert "| label_density |" in text  # its rule and its rejections in the scores table
    few = {"synthetic": {**_synthetic_section(40, 2), "per_stage": {}}}
    (warning,) = [w for w in warnings_of(few) if "degenerate" in w]
    assert "2 of 40" in warning and "labeller failed" not in warning  # a few odd labels: rejected, not a failure
