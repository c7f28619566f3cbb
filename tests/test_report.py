"""The report's quality-bar verdicts and tables are computed from report.json, never typed in."""
from tasks.report import bar_checks, render_card, render_report


def _report(p2p_dice=0.70, p2p_cldice=0.72, crgan_ssim=0.68, crgan_psnr=23.4, own=0.58, other=0.12):
    scores = lambda dice, cl: {"dice": dice, "iou": dice / 2, "cldice": cl, "n": 10}  # noqa: E731
    img = lambda s, p: {"ssim": s, "psnr": p, "mse": 0.005, "cosine": 0.97}  # noqa: E731
    return {
        "pix2pix": {"test": scores(p2p_dice, p2p_cldice),
                    "baselines": {"otsu": scores(0.60, 0.61), "frangi": scores(0.62, 0.70)}},
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


def test_warnings_name_missed_bars_zero_accepted_and_degenerate_labels():
    from tasks.report import bars_summary, warnings_of

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


def test_report_and_card_say_which_generator_objective_made_the_labels():
    from brvo_models.configs import Pix2PixConfig
    from brvo_models.pix2pix import objective_text

    report = _report()
    report["pix2pix"]["objective"] = objective_text(Pix2PixConfig(lambda_dice=100))
    expected = "BCE PatchGAN + 100 x L1 + 100 x soft Dice (not in the reference pix2pix)"
    assert f"Generator objective: {expected}." in render_report(report, "phantom")
    assert f"Generator objective: {expected}." in render_card(report, {}, "phantom")
    assert objective_text(Pix2PixConfig()) == "BCE PatchGAN + 100 x L1 (the reference pix2pix objective)"
