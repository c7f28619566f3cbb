"""benchmarks/growth_curve.py: its cells, scaled configs, predictions, growth verdicts and memory numbers are right."""
from __future__ import annotations

import argparse
import sys

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def growth():
    return load_benchmark("growth_curve")


def test_a_cell_is_patients_x_size_and_a_bad_one_is_refused(growth):
    assert growth.parse_cell("120x128") == growth.Cell(120, 128)
    for bad in ("12x60", "12", "x64", "0x64", "12x2048", "twelve x 64"):
        with pytest.raises(argparse.ArgumentTypeError, match="cell"):
            growth.parse_cell(bad)


def test_scale_one_is_the_demo_preset_and_a_scale_shrinks_every_training_budget(growth):
    from tasks.config import config_from, preset

    demo = preset("demo")
    assert config_from("demo", growth.scaled_config(64, 1.0, 1.0)) == demo
    scaled = config_from("demo", growth.scaled_config(128, 0.05, 0.5))
    assert scaled.image_size == 128
    for model, demo_model in ((scaled.pix2pix, demo.pix2pix), (scaled.crgan, demo.crgan)):
        assert model.min_steps == round(demo_model.min_steps * 0.05)
        assert model.max_steps == round(demo_model.max_steps * 0.05)
        assert model.epochs == max(1, round(demo_model.epochs * 0.05))
    assert scaled.segmenter_steps == round(demo.segmenter_steps * 0.05)
    assert scaled.usefulness.segmenter.steps == round(demo.usefulness.segmenter.steps * 0.5)
    assert scaled.usefulness.forecaster.steps == round(demo.usefulness.forecaster.steps * 0.5)
    # what the scale must not touch: validation cadence, model widths, batch sizes, precision
    assert scaled.pix2pix.val_every == demo.pix2pix.val_every and scaled.crgan.batch_size == demo.crgan.batch_size
    assert scaled.usefulness.segmenter.precision == demo.usefulness.segmenter.precision


def test_full_schedule_steps_follow_the_adaptive_clamp(growth):
    from tasks.config import preset

    demo = preset("demo")
    p, c = demo.pix2pix, demo.crgan

    def clamp(epochs_steps, model):
        return min(max(epochs_steps, model.min_steps), model.max_steps)

    # the demo's 53-patient phantom: 594 train rows (75 batches of 8), 37 train patients (5 batches)
    assert growth.full_schedule_steps(594, 37) == {"pix2pix": clamp(p.epochs * 75, p), "crgan": clamp(c.epochs * 5, c),
                                                   "segmenter": demo.segmenter_steps}
    # a small dataset still gets min_steps; a larger one proportionally more, up to max_steps
    assert growth.full_schedule_steps(40, 8)["pix2pix"] == p.min_steps
    assert growth.full_schedule_steps(1200, 84)["pix2pix"] == clamp(p.epochs * 150, p) > p.min_steps
    assert growth.full_schedule_steps(100_000, 84)["pix2pix"] == p.max_steps


def _report(p2p_steps=1200, crgan_steps=500, seg_steps=2000, cached=()):
    return {"timings_s": {"total": 1000.0, "cached": list(cached), "ingest": 5.0, "preprocess": 5.0,
                          "pix2pix": 700.0, "crgan": 200.0, "fill": 2.0, "label": 4.0, "usefulness": 84.0},
            "pix2pix": {"training": {"steps": p2p_steps, "planned_steps": p2p_steps, "seconds": 600.0, "n_train": 594},
                        "segmenter_params": {"steps": seg_steps, "seconds": 80.0}},
            "crgan": {"training": {"steps": crgan_steps, "planned_steps": crgan_steps, "seconds": 150.0,
                                   "n_train_patients": 37}}}


def test_time_splits_into_training_per_image_work_and_overhead(growth):
    split = growth.split_time(_report(), wall_s=1030.0)
    assert split["training_s"] == pytest.approx(600 + 80 + 150 + 84)
    # the rest of the steps' seconds: ingest, preprocess, fill, label and the trainings' evaluation parts
    assert split["per_image_s"] == pytest.approx(5 + 5 + 2 + 4 + (700 - 600 - 80) + (200 - 150))
    assert split["overhead_s"] == pytest.approx(30.0)
    assert split["training"]["pix2pix"]["s_per_step"] == pytest.approx(0.5)


def test_a_run_served_from_cache_is_refused(growth):
    with pytest.raises(ValueError, match="cache"):
        growth.split_time(_report(cached=["pix2pix"]), wall_s=1000.0)


def test_the_prediction_at_full_scale_is_the_measured_time_and_scales_the_trainings_up(growth):
    at_full = growth.predict_full(growth.split_time(_report(), 1030.0), 594, 37, usefulness_scale=1.0)
    assert at_full["total_s"] == pytest.approx(1030.0)
    # the same seconds for a tenth of the steps: each training's full steps cost ten times as much
    tenth = growth.split_time(_report(p2p_steps=120, crgan_steps=50, seg_steps=200), 1030.0)
    predicted = growth.predict_full(tenth, 594, 37, usefulness_scale=0.1)
    assert predicted["training_s"] == pytest.approx({"pix2pix": 6000.0, "crgan": 1500.0, "segmenter": 800.0})
    assert predicted["usefulness_s"] == pytest.approx(840.0)
    assert predicted["total_s"] == pytest.approx(tenth["per_image_s"] + 30.0 + 6000 + 1500 + 800 + 840)


def test_growth_is_judged_from_time_per_image(growth):
    images = [100.0, 200.0, 450.0, 1000.0]
    linear = [20 + 0.5 * n for n in images]  # fixed cost + per image: time per image falls
    fit = growth.linear_fit(images, linear)
    assert (fit["a_s"], fit["b_s_per_image"]) == (pytest.approx(20.0), pytest.approx(0.5))
    assert fit["worst_residual_share"] == pytest.approx(0.0, abs=1e-9)
    assert growth.growth_check(images, linear)["verdict"] == "at most linear"
    quadratic = [0.01 * n * n for n in images]
    check = growth.growth_check(images, quadratic)
    assert check["verdict"] == "FASTER THAN LINEAR"
    assert check["worst_ratio"] == pytest.approx(10.0) and check["pair"] == [100.0, 1000.0]
    # within the tolerance for noise, still linear; beyond it, not
    assert growth.growth_check([100, 200], [100, 200 * 1.09])["verdict"] == "at most linear"
    assert growth.growth_check([100, 200], [100, 200 * 1.12])["verdict"] == "FASTER THAN LINEAR"
    assert growth.growth_check([100], [5.0])["worst_ratio"] is None


HOLD = "import sys, time; block = b'\\x01' * ({mib} << 20); time.sleep(1.5)"


def test_memory_is_measured_for_the_largest_process_and_the_tree(growth, tmp_path):
    # a parent holding 60 MiB that starts a child holding 60 MiB: the tree holds both at once
    child = HOLD.format(mib=60)
    parent = (f"import subprocess, sys; block = b'\\x01' * (60 << 20); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    measured = growth.run_measured([sys.executable, "-c", parent], tmp_path / "log.txt", env=None)
    assert 60 <= measured["largest_process_rss_mib"] < 115
    assert measured["tree_rss_mib"] >= 120
    assert measured["wall_s"] >= 1.5


def test_a_failed_command_raises_with_its_log(growth, tmp_path):
    with pytest.raises(RuntimeError, match="(?s)exited 3.*boom"):
        growth.run_measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                            tmp_path / "log.txt", env=None)


def test_growth_faster_than_linear_is_a_warning_not_only_a_table_cell(growth):
    def check(seconds):
        return {"check": growth.growth_check([100, 1000], seconds), "fit": None}

    grown = {"64": {"wall": check([10, 100]), "per_image_work": check([10, 300]), "predicted_full": check([50, 100])}}
    warnings = growth.growth_warnings(grown)
    assert len(warnings) == 1 and "per_image_work grows faster than linearly" in warnings[0] and "3.00x" in warnings[0]
    one_cell = {"128": {k: {"check": growth.growth_check([100], [5.0]), "fit": None}
                        for k in ("wall", "per_image_work", "predicted_full")}}
    assert all("not checkable" in w for w in growth.growth_warnings(one_cell))
