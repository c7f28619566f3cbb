"""The report's quality-bar verdicts and tables are computed from report.json, never typed in."""
import numpy as np
import pandas as pd

from tasks.rendering.report import bar_checks, render_card, render_report


def _report(p2p_dice=0.70, p2p_cldice=0.72, crgan_ssim=0.68, crgan_psnr=23.4, own=0.58, other=0.12):
    scores = lambda dice, cl: {"dice": dice, "iou": dice / 2, "cldice": cl, "n": 10}  # noqa: E731
    img = lambda s, p: {"ssim": s, "psnr": p, "mse": 0.005, "cosine": 0.97}  # noqa: E731
    return {
        "pix2pix": {"test": scores(p2p_dice, p2p_cldice),
                    "baselines": {"otsu": scores(0.60, 0.61), "frangi": scores(0.62, 0.70),
                                  "segmenter": scores(0.66, 0.68)},
                    "segmenter_params": {"arch": "dilated CNN", "steps": 2000, "best_step": 1800, "threshold": 0.55}},
        "crgan": {"heldout": {"n": 5, "model": img(crgan_ssim, crgan_psnr),
                              "baselines": {"nearest": img(0.65, 22.8), "neighbour_mean": img(0.67, 23.1)},
                              "test_only": {"n": 2, "model": img(0.69, 23.5), "nearest": img(0.64, 22.7),
                                            "neighbour_mean": img(0.66, 23.0)},
                              "per_stage": {"s1t2": {"n": 5, "model": img(crgan_ssim, crgan_psnr),
                                                     "nearest": img(0.65, 22.8),
                                                     "neighbour_mean": img(0.67, 23.1)}}},
                  "sample_quality": {"own_vs_other_ssim": {"own": own, "other": other}}},
    }


def test_bars_met_when_the_models_beat_every_baseline_on_every_metric():
    assert bar_checks(_report()) == {"pix2pix_beats_baselines": True, "crgan_beats_baselines": True,
                                     "crgan_patient_specific": True}


def test_one_lost_metric_fails_its_bar():
    assert bar_checks(_report(p2p_cldice=0.69))["pix2pix_beats_baselines"] is False  # Frangi clDice 0.70
    assert bar_checks(_report(crgan_psnr=23.0))["crgan_beats_baselines"] is False  # neighbour mean 23.1
    assert bar_checks(_report(own=0.1))["crgan_patient_specific"] is False


def test_missing_sections_are_left_out_not_guessed():
    assert bar_checks({}) == {}
    assert list(bar_checks({"pix2pix": _report()["pix2pix"]})) == ["pix2pix_beats_baselines"]


def test_rendered_report_shows_the_verdicts_and_the_per_stage_table():
    text = render_report(_report(p2p_dice=0.5), "phantom")
    assert "| pix2pix_beats_baselines | **no** |" in text
    assert "| crgan_beats_baselines | yes |" in text
    assert "| s1t2 | 5 | 0.6800 / 23.40 | 0.6500 / 22.80 | 0.6700 / 23.10 |" in text
    assert "Test patients only (2 cases" in text and "| CRGAN | 0.6900 | 23.5000 |" in text


def test_dataset_card_carries_the_measured_quality_and_missed_bars():
    report = _report(p2p_dice=0.5)
    card = render_card(report, {}, "phantom")
    assert "Pix2Pix labels on held-out real test patients: Dice 0.500" in card
    assert "2 of 3 quality bars met; not met: pix2pix_beats_baselines" in card
    assert card.startswith("# Dataset card") and "> **WARNING** quality bar not met: pix2pix_beats_baselines" in card


def test_dataset_card_names_the_label_resize_rule_dice_depends_on():
    from tasks.config import preset

    config = preset("tiny").with_overrides(label_resize="max")
    card = render_card(_report(), {"config_json": config.to_json(), "image_size": 32}, "phantom")
    assert "preprocess (32 px, annotations resized by max (any vessel pixel in the footprint))" in card
    assert "annotations resized by nearest neighbour" in render_card(_report(), {}, "phantom")  # older files


def test_warnings_name_missed_bars_zero_accepted_and_degenerate_labels():
    from tasks.rendering.report import bars_summary, warnings_of

    report = {**_report(p2p_dice=0.5), "synthetic": {"n": 42, "accepted": 0, "degenerate_labels": 5,
                                                     "per_stage": {}, "scores": {}}}
    warnings = warnings_of(report)
    assert len(warnings) == 3
    assert warnings[0].startswith("quality bar not met: pix2pix_beats_baselines")
    assert "none of the 42 synthetic samples was accepted" in warnings[1]
    assert "5 of 42 synthetic labels are degenerate" in warnings[2]
    assert bars_summary(report) == "2 of 3 quality bars met"
    text = render_report(report, "phantom")
    assert "**2 of 3 quality bars met.**" in text and text.count("> **WARNING**") == 3
    assert warnings_of(_report()) == [] and "WARNING" not in render_report(_report(), "phantom")


def test_report_names_the_models_origin_and_the_acceptance_rule():
    report = _report()
    report["pix2pix"]["registry_version"] = "v0003-20261201T030012Z"
    report["config"] = {"min_consistency_ssim": 0.2, "min_realism": 0.05, "max_abs_density_z": 3.0,
                        "min_label_confidence": 0.6}
    report["synthetic"] = {"n": 4, "accepted": 3, "per_stage": {}, "rejected_by": {"realism": 1},
                           "scores": {"realism": {"mean": 0.4, "p10": 0.1, "p90": 0.5}}}
    text, card = render_report(report, "phantom"), render_card(report, {}, "phantom")
    for doc in (text, card):
        assert "Pix2Pix: registry version v0003-20261201T030012Z; CRGAN: trained in this run" in doc
    assert "| realism | 0.4000 | 0.1000 | 0.5000 | >= 0.05 | 1 |" in text
    assert "label_confidence >= 0.6" in card and "density_z |z| <= 3.0" in card
    report["timings_s"] = {"pix2pix": 0.4, "crgan": 61.0, "score": 2.0, "total": 63.4, "cached": ["score"]}
    text = render_report(report, "phantom")
    assert "| pix2pix | 0.4000 | loaded registry version v0003-20261201T030012Z |" in text
    assert "| crgan | 61.0000 | ran |" in text and "| score | 2.0000 | served from cache |" in text


def test_report_and_card_show_the_calibrated_thresholds_and_warn_when_calibration_fell_back():
    from tasks.config import preset
    from tasks.rendering.report import warnings_of
    from tasks.score import AcceptanceThresholds, calibrate_thresholds

    real = pd.DataFrame({"consistency_ssim": np.linspace(0.4, 0.9, 100), "realism": 0.55,
                         "density_z": np.linspace(-1, 1, 100), "label_confidence": np.linspace(0.97, 0.99, 100)})
    calibrated = calibrate_thresholds(real, preset("demo"), split="val", patients=8)
    report = _report()
    report["config"] = {"min_consistency_ssim": 0.2, "min_realism": 0.05, "max_abs_density_z": 3.0,
                        "min_label_confidence": 0.6}
    report["synthetic"] = {"n": 4, "accepted": 3, "per_stage": {}, "rejected_by": {"label_confidence": 1},
                           "scores": {"label_confidence": {"mean": 0.98, "p10": 0.97, "p90": 0.99}},
                           "thresholds": calibrated.model_dump()}
    text, card = render_report(report, "phantom"), render_card(report, {}, "phantom")
    bound = f"{calibrated.min_label_confidence:.4g}"
    assert f"| >= {bound} | 1 |" in text and f"label_confidence >= {bound}" in card  # the run's, not the config's
    for doc in (text, card):
        assert "calibrated on 100 held-out real rows (8 patients of the val split)" in doc
    assert warnings_of(report) == []
    fallback = AcceptanceThresholds.from_config(preset("demo"), fallback_reason="only 3 real rows")
    report["synthetic"]["thresholds"] = fallback.model_dump()
    assert warnings_of(report) == ["acceptance thresholds not calibrated on real rows: only 3 real rows"]
    assert "> **WARNING** acceptance thresholds not calibrated" in render_card(report, {}, "phantom")


def test_report_and_card_say_which_generator_objective_made_the_labels():
    from brvo_models.configs import Pix2PixConfig
    from brvo_models.pix2pix import objective_text

    report = _report()
    report["pix2pix"]["objective"] = objective_text(Pix2PixConfig(lambda_dice=100))
    expected = "BCE PatchGAN + 100 x L1 + 100 x soft Dice (not in the reference pix2pix)"
    assert f"Generator objective: {expected}." in render_report(report, "phantom")
    assert f"Generator objective: {expected}." in render_card(report, {}, "phantom")
    assert objective_text(Pix2PixConfig()) == "BCE PatchGAN + 100 x L1 (the reference pix2pix objective)"


def test_report_and_card_say_how_labels_are_made_and_what_flips_give_the_segmenter():
    report = _report()
    averaged = " Labels are the mean of the generator's probabilities over each image's four flips."
    assert averaged not in render_report(report, "phantom")  # a run that did not record it: nothing claimed
    report["pix2pix"]["flip_average"] = True
    report["pix2pix"]["segmenter_params"]["flip_averaged_test"] = {"dice": 0.671, "cldice": 0.69, "n": 10}
    text = render_report(report, "phantom")
    assert averaged in text and averaged in render_card(report, {}, "phantom")
    assert "the same segmenter averaged over each image's four flips, as Pix2Pix labels, scores Dice 0.6710" in text
    # flip-averaged segmenter scores are shown, never judged: the bar compares with the plain segmenter only
    report["pix2pix"]["segmenter_params"]["flip_averaged_test"]["dice"] = 0.99
    assert bar_checks(report)["pix2pix_beats_baselines"] is True
    report["pix2pix"]["flip_average"] = False
    assert "Labels are one pass of the generator per image." in render_report(report, "phantom")


def test_a_supervised_segmenter_that_labels_better_fails_the_bar_with_a_warning():
    """The third label baseline counts like Otsu and Frangi: Pix2Pix below it on either metric misses the bar."""
    from tasks.rendering.report import warnings_of

    assert bar_checks(_report(p2p_dice=0.67, p2p_cldice=0.71))["pix2pix_beats_baselines"] is True
    below = _report(p2p_dice=0.65, p2p_cldice=0.71)  # Otsu and Frangi beaten, the segmenter (0.66) is not
    assert bar_checks(below)["pix2pix_beats_baselines"] is False
    assert any(w.startswith("quality bar not met: pix2pix_beats_baselines") for w in warnings_of(below))
    text = render_report(below, "phantom")
    assert "| baseline: segmenter | 0.6600 |" in text
    assert "trained 2000 steps on the same train rows" in text and "threshold 0.5500" in text
    assert "segmenter 0.660" in render_card(below, {}, "phantom")


def test_training_curves_show_only_models_trained_in_this_run(tmp_path):
    """A registry run has no training history: no empty picture in the report, and a half-registry
    run draws the one model it trained."""
    from tasks.rendering.figures import training_curves

    out = tmp_path / "curves.png"
    assert training_curves({"pix2pix": [], "crgan": []}, out) is None and not out.exists()
    history = [{"step": s, "loss_G": 1.0 / s, "val_dice": 0.1 * s, "val_score": 0.1 * s} for s in (1, 2, 3)]
    assert training_curves({"pix2pix": history, "crgan": []}, out) == out
    from PIL import Image

    assert Image.open(out).size[0] < Image.open(out).size[1] * 1.5  # one column, not two


def test_timeline_montage_captions_fit_on_the_picture(tmp_path):
    """A synthetic stage's caption (stage, sample, two score lines) is drawn whole, not cut at the bottom."""
    import numpy as np
    from PIL import Image

    from tasks.rendering.figures import MontageTile, timeline_montage

    image, label = np.full((16, 16), 128, np.uint8), np.zeros((16, 16), np.uint8)
    tiles = {0: MontageTile(image, label, "real", ("exam 1",)),
             1: MontageTile(image, label, "rejected", ("sample 0, 0/2 acc.", "ssim 0.74 real 0.51", "z 9.10 conf 0.50"))}
    out = timeline_montage(tiles, "patient 1", tmp_path / "m.png")
    pixels = np.asarray(Image.open(out).convert("L"))
    dark_rows = np.flatnonzero((pixels < 100).any(axis=1))
    assert dark_rows.max() < pixels.shape[0] - 2  # white margin under the last caption line


def test_live_training_table_marks_the_best_validation_and_fits_the_page():
    """What a researcher follows in the UI during a long run: the latest validations, the best one marked."""
    from tasks.shared.progress import TrainingProgress

    progress = TrainingProgress("pix2pix")
    for step, score in ((100, 0.4), (200, 0.6), (300, 0.5)):
        progress({"step": step, "total_steps": 400, "epoch": step // 50, "G_L1": 90.0 - step / 10, "val_score": score,
                  "val_dice": score, "lr_factor": 1.0, "seconds": step / 10, "seconds_validating": 0.5})
    text = progress.markdown()
    assert "step 300 of 400; best val_score 0.6 at step 200 (the checkpoint kept)" in text
    header = next(line for line in text.splitlines() if line.startswith("| step"))
    assert header == "| step | G_L1 | val_score | val_dice | seconds |"
    best_rows = [line for line in text.splitlines() if "**best**" in line]
    assert len(best_rows) == 1 and best_rows[0].startswith("| 200 |")


def test_a_run_with_few_test_patients_warns_that_its_verdicts_do_not_generalise():
    from tasks.rendering.report import MIN_TEST_PATIENTS, bars_summary, warnings_of

    report = _report()
    report["pix2pix"]["n_test_patients"] = MIN_TEST_PATIENTS
    assert warnings_of(report) == []
    report["pix2pix"]["n_test_patients"] = 2
    (warning,) = warnings_of(report)
    assert warning.startswith("only 2 held-out test patient(s)")
    assert bars_summary(report) == "3 of 3 quality bars met"  # a caveat on the bars, not a missed bar
    text, card = render_report(report, "phantom"), render_card(report, {}, "phantom")
    assert f"> **WARNING** {warning}" in text and warning in card
    # a report without a Pix2Pix section (a usefulness-only study) takes the count from the usefulness split
    assert warnings_of({"usefulness": {"patients": {"train": 6, "val": 2, "test": 3}}})[0].startswith("only 3")
