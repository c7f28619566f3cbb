"""The held-out check by gap kind reaches the reader: report.md's table and the card's after-last-visit line."""
from __future__ import annotations

from tasks.rendering.report import render_card, render_report

SCORES = {"ssim": 0.6, "psnr": 22.0, "mse": 0.01, "cosine": 0.9}


def _report(per_gap):
    heldout = {"n": 6, "model": SCORES, "baselines": {"nearest": SCORES, "neighbour_mean": SCORES}}
    if per_gap is not None:
        heldout["per_gap"] = per_gap
    return {"crgan": {"heldout": heldout}}


PER_GAP = {
    "interior": {"n": 2, "n_patients": 2, "model": {"ssim": 0.71, "psnr": 23.0}, "nearest": {"ssim": 0.65, "psnr": 22.0},
                 "neighbour_mean": {"ssim": 0.70, "psnr": 22.5},
                 "course": {"real_change_mean": -1.5, "model_change_mean": -1.2, "carried": 0.8, "offset": 0.3}},
    "after_last": {"n": 4, "n_patients": 3, "model": {"ssim": 0.66, "psnr": 22.0}, "nearest": {"ssim": 0.645, "psnr": 21.9},
                   "neighbour_mean": {"ssim": 0.645, "psnr": 21.9},
                   "course": {"real_change_mean": -1.27, "model_change_mean": -0.4, "carried": 0.32, "offset": 0.87}},
}


def test_the_report_splits_held_out_cases_by_gap_and_says_how_much_of_the_course_they_carry():
    text = render_report(_report(PER_GAP), "phantom")
    assert "By kind of gap" in text
    assert "| after the last visit | 4 | 0.6600 | 0.6450 | 0.6450 | -1.27 | -0.40 | 32 % |" in text
    assert "| between two visits | 2 |" in text
    card = render_card(_report(PER_GAP), {}, "phantom")
    assert "After the last visit (SOUL's common gap; 4 held-out stages): SSIM 0.660 against 0.645" in card
    assert "carries 32 % of the real change in non-perfusion (-1.27 points)" in card


def test_a_report_without_the_split_leaves_it_out():
    assert "By kind of gap" not in render_report(_report(None), "phantom")
    assert "After the last visit" not in render_card(_report(None), {}, "phantom")
