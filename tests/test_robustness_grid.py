"""benchmarks/robustness_grid.py: its verdicts follow the rules written in advance, and a row runs the product."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def grid():
    return load_benchmark("robustness_grid")


def _labels(pix, segmenter):
    s = lambda d, c: {"dice": d, "cldice": c}  # noqa: E731
    return {"pix2pix": s(*pix), "otsu": s(0.5, 0.5), "frangi": s(0.6, 0.6), "segmenter": s(*segmenter)}


def test_a_model_beats_a_baseline_on_the_seed_mean_of_both_metrics(grid):
    both = [{"labels": _labels((0.70, 0.70), (0.68, 0.69))}, {"labels": _labels((0.69, 0.71), (0.68, 0.69))}]
    assert grid.verdict(both, "labels", "pix2pix", "segmenter", ("dice", "cldice")) == "yes, every seed"
    # seed 1 loses on Dice but the mean still wins: "yes", not "every seed"
    mixed = [{"labels": _labels((0.72, 0.70), (0.68, 0.69))}, {"labels": _labels((0.67, 0.71), (0.68, 0.69))}]
    assert grid.verdict(mixed, "labels", "pix2pix", "segmenter", ("dice", "cldice")) == "yes"
    # higher Dice, lower clDice: a loss
    split = [{"labels": _labels((0.70, 0.68), (0.68, 0.69))}] * 2
    assert grid.verdict(split, "labels", "pix2pix", "segmenter", ("dice", "cldice")) == "**no**"
    assert grid.verdict(split[:1], "labels", "pix2pix", "otsu", ("dice", "cldice")) == "yes (1 seed)"


def test_a_recipe_gain_is_real_only_above_0_01_and_on_a_majority_of_datasets(grid):
    base = {"a": 0.60, "b": 0.60, "c": 0.60}
    assert grid.real_gain({"a": 0.62, "b": 0.62, "c": 0.61}, base)
    assert not grid.real_gain({"a": 0.605, "b": 0.61, "c": 0.61}, base)  # mean gain 0.0083
    assert not grid.real_gain({"a": 0.66, "b": 0.59, "c": 0.59}, base)  # mean 0.013, but up on one of three


def test_select_keeps_the_incumbent_unless_a_candidate_really_gains(grid, tmp_path, capsys):
    results = tmp_path / "val.jsonl"
    rows = []
    for variant, scores in (({}, (0.60, 0.62)), ({"pix2pix": {"lr": 0.002}}, (0.63, 0.65)),
                            ({"pix2pix": {"lr": 0.001}}, (0.64, 0.65))):
        for patients, score in zip((24, 53), scores):
            rows.append({"patients": patients, "visits": "1-2", "seed": 0, "size": 64, "variant": variant,
                         "val_only": True, "pix2pix_fit": {"val_dice": score}})
    results.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # finish order does not matter
    chosen = tmp_path / "chosen.json"
    assert grid.main(["select", str(results), "--write", str(chosen), "--candidates", "{}",
                      '{"pix2pix": {"lr": 0.002}}', '{"pix2pix": {"lr": 0.001}}']) == 0
    # lr 0.002 gains 0.03 on both; lr 0.001 gains only 0.005 more over it: the first stays chosen
    assert json.loads(chosen.read_text()) == {"pix2pix": {"lr": 0.002}}


def test_one_row_runs_the_product_and_the_table_shows_what_was_not_run(grid, tmp_path, capsys):
    tiny = {"pix2pix": {"min_steps": 3, "max_steps": 3, "val_every": 3, "ngf": 8, "ndf": 8},
            "crgan": {"min_steps": 3, "max_steps": 3, "val_every": 3}, "segmenter_steps": 3}
    out = tmp_path / "grid.jsonl"
    assert grid.main(["one", "--data", str(tmp_path / "data"), "--out", str(out), "--device", "cpu",
                      "--threads", "1", "--variant", json.dumps(tiny), "--cell", "12", "1-2", "0", "64"]) == 0
    (row,) = grid.read_rows(out)
    assert set(row["labels"]) == {"pix2pix", "otsu", "frangi", "segmenter", grid.SEGMENTER_FLIPPED}
    assert set(row["images"]) == {"crgan", "nearest", "neighbour_mean"}
    assert row["pix2pix_fit"]["steps"] == 3 and row["crgan_fit"]["steps"] == 3
    assert row["segmenter_params"]["steps"] == 3 and row["labels"]["pix2pix"]["n"] > 0
    assert (tmp_path / "data" / "ph12_v1-2_s0_64px" / "soul.h5").exists()
    # the row ran the product's steps with the step engine: a second run of the cell is served from their records
    assert row["cached_steps"] == []
    assert grid.main(["one", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "again.jsonl"), "--device",
                      "cpu", "--threads", "1", "--variant", json.dumps(tiny), "--cell", "12", "1-2", "0", "64"]) == 0
    (again,) = grid.read_rows(tmp_path / "again.jsonl")
    assert again["cached_steps"] == ["preprocess", "pix2pix", "crgan"]
    assert again["labels"] == row["labels"] and again["images"] == row["images"]
    # a variant with another label rule gets its own dataset (same phantom), never the cached nearest-rule one
    assert grid.main(["one", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "max.jsonl"), "--device", "cpu",
                      "--threads", "1", "--variant", json.dumps({**tiny, "label_resize": "max"}), "--models", "pix2pix",
                      "--val-only", "--cell", "12", "1-2", "0", "64"]) == 0
    from storage.paired_format import read_arrays
    nearest = read_arrays(tmp_path / "data" / "ph12_v1-2_s0_64px" / "soul.h5")[1]
    most = read_arrays(tmp_path / "data" / "ph12_v1-2_s0_64px_labels-max" / "soul.h5")[1]
    assert most.shape == nearest.shape and most.sum() > nearest.sum()
    capsys.readouterr()
    assert grid.main(["table", str(out), "--patients", "12", "24", "--visits", "1-2", "--sizes", "64"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 12") or line.startswith("| 24")]
    assert len(lines) == 2 and "(1 seed)" in lines[0] and "not run" in lines[1]
    assert lines[0].count("|") == lines[1].count("|")  # the not-run row keeps the table's columns
