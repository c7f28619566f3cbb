"""The truth of the missed visits (the phantom renders them) and the fill_truth evaluation against it.

Rules fixed before measuring: writing the truth changes no byte of the SOUL tree, and no pipeline step
reads it; a filled stage is judged against its true scan beside nearest-stage copy, neighbour mean,
a real repeat scan and the oracle (the mean of the other truth scans). Fake "synthetic" rows built from
truth scans or from nearest copies have known answers: the true scan itself closes 100 % of the SSIM gap
and carries 100 % of the course; a copy of the nearest stage carries 0 %.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brvo_models.phantom import anatomy
from brvo_models.phantom.config import PhantomConfig
from brvo_models.phantom.truth import (TRUTH_STREAM, read_truth, truth_scans, write_truth)
from brvo_models.phantom.visit_plan import plan_visits
from storage.errors import BrvoError
from storage.hashing import file_sha256, json_sha256
from storage.paired_format import STAGE_NAMES
from flows.phantom import generate_phantom
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]
#: 6 patients at 32 px, 1-2 scans per visit, attendance falling off: 3 interior gaps, 11 after the last visit
#: and 1 before the first.
TINY = PhantomConfig(n_patients=6, seed=1, image_size=32, images_per_visit=(1, 2),
                     attendance=(0.9, 0.7, 0.7, 0.5, 0.5, 0.3))


def _digest(root: Path) -> str:
    return json_sha256({p.relative_to(root).as_posix(): file_sha256(p)
                        for p in sorted(root.rglob("*")) if p.is_file()}, 64)


@pytest.fixture(scope="module")
def tiny_truth(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("truth")
    generate_phantom(root / "soul", TINY, workers=1, truth_dir=root / "truth")
    return root / "soul", root / "truth"


# --------------------------------------------------------------------------------------------- the truth dir

def test_truth_dir_leaves_the_soul_tree_unchanged(tiny_truth, tmp_path):
    soul, _ = tiny_truth
    generate_phantom(tmp_path / "plain", TINY, workers=1)
    assert _digest(soul) == _digest(tmp_path / "plain")
    assert {p.name for p in soul.iterdir()} == {"S1", "S2", "S3", "Infomation.xlsx"}


def test_truth_holds_every_missed_pair_with_its_own_repeat_scans(tiny_truth):
    soul, truth_dir = tiny_truth
    truth = read_truth(truth_dir)
    plan = plan_visits(TINY)
    missed = {(str(p + 1), s) for p in range(TINY.n_patients) for s in range(6) if not plan.attendance[p, s]}
    assert missed and truth.missing_pairs() == sorted(missed, key=lambda x: (int(x[0]), x[1]))
    assert truth.n_repeats >= 9
    for pid, stage in missed:
        images, labels = truth.load(pid, stage)
        assert images.shape == (truth.n_repeats, 32, 32) and images.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1} and labels.any()
        assert not any(np.array_equal(images[0], images[k]) for k in range(1, truth.n_repeats))  # noise of its own
        # not a file of the tree: the patient has no folder for this stage there
        assert not (soul / f"S{stage // 2 + 1}" / STAGE_NAMES[stage] / "image" / pid).exists()
    # observed pairs have no truth scans
    observed = next((str(p + 1), s) for p in range(TINY.n_patients) for s in range(6) if plan.attendance[p, s])
    with pytest.raises(BrvoError, match="no truth scans"):
        truth.load(*observed)


def test_truth_scan_is_the_stage_as_the_tree_would_have_scanned_it(tiny_truth):
    """The truth's renderer with the tree's own RNG stream gives the tree's image: the same anatomy, stage
    and acquisition, so a truth scan is a scan of that visit (only the stream differs)."""
    soul, _ = tiny_truth
    plan = plan_visits(TINY)
    p, s = next((p, s) for p in range(TINY.n_patients) for s in range(1, 6) if plan.attendance[p, s])
    pid, exam = str(p + 1), plan.exam_ids[p][s][0]
    images, labels = truth_scans(TINY, p, s, streams=[0])
    tree_image = np.asarray(Image.open(soul / f"S{s // 2 + 1}" / STAGE_NAMES[s] / "image" / pid / f"{pid}_{exam}.jpg"))
    tree_label = np.asarray(Image.open(soul / f"S{s // 2 + 1}" / STAGE_NAMES[s] / "label" / pid / f"{pid}_{exam}.jpg"))
    assert np.abs(images[0].astype(int) - tree_image).mean() < 3  # JPEG q95 only
    assert np.array_equal(labels[0] > 0, tree_label > 127)
    # the truth's own streams are disjoint from the tree's (at most 8 scans a visit: streams 0..7)
    assert TRUTH_STREAM >= 8
    other, _ = truth_scans(TINY, p, s, streams=[TRUTH_STREAM])
    assert not np.array_equal(other[0], images[0])


def test_every_pair_has_the_phantoms_true_area(tiny_truth):
    _, truth_dir = tiny_truth
    stages = read_truth(truth_dir).stages
    assert len(stages) == TINY.n_patients * 6
    plan = plan_visits(TINY)
    for p in range(TINY.n_patients):
        params = anatomy.build_anatomy(TINY, p).params
        mine = stages[stages["patient_id"] == str(p + 1)].sort_values("stage")
        assert np.allclose(mine["true_area"], [params.area(s) for s in range(6)], rtol=1e-9)
        assert list(mine["observed"]) == list(plan.attendance[p])
        assert list(mine["n_scans"]) == list(plan.exam_counts[p])


def test_truth_is_the_same_bytes_with_any_workers(tiny_truth, tmp_path):
    _, truth_dir = tiny_truth
    write_truth(tmp_path / "t2", TINY, map_patients=map)
    generate_phantom(tmp_path / "soul", TINY, workers=2, truth_dir=tmp_path / "t3")
    assert _digest(tmp_path / "t2") == _digest(truth_dir) == _digest(tmp_path / "t3")


def test_truth_dir_must_be_outside_the_tree_and_not_someone_elses(tmp_path):
    one = PhantomConfig(n_patients=2, image_size=32)
    with pytest.raises(BrvoError, match="outside"):
        generate_phantom(tmp_path / "soul", one, workers=1, truth_dir=tmp_path / "soul" / "truth")
    with pytest.raises(BrvoError, match="outside"):
        generate_phantom(tmp_path / "soul", one, workers=1, truth_dir=tmp_path / "soul")
    assert not (tmp_path / "soul").exists()  # refused before any work
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BrvoError, match="not empty"):
        write_truth(tmp_path / "busy", one)
    with pytest.raises(BrvoError, match="more than a phantom truth"):
        write_truth(tmp_path / "busy", one, overwrite=True)
    write_truth(tmp_path / "t", one)
    write_truth(tmp_path / "t", PhantomConfig(n_patients=3, image_size=32), overwrite=True)
    assert read_truth(tmp_path / "t").config.n_patients == 3
    with pytest.raises(BrvoError, match="truth.json"):
        read_truth(tmp_path / "busy")


def test_no_pipeline_step_reads_the_truth(tiny_truth, tmp_path):
    """Ingest of the tree with the truth beside it lists the tree's files only; and nothing under tasks/
    or flows/ but the phantom step that writes it (and its command-line flag) names the truth module."""
    from tasks.ingest import ingest

    soul, truth_dir = tiny_truth
    assert truth_dir.parent == soul.parent
    ingest(soul, tmp_path / "run", log=lambda _m: None, workers=1)
    manifest = pd.read_csv(tmp_path / "run" / "manifest.csv", dtype=str)
    tree = sorted(str(p) for p in soul.rglob("image/*/*.jpg"))
    assert sorted(str(Path(p).resolve()) for p in manifest["image_path"]) == sorted(
        str(Path(p).resolve()) for p in tree)
    assert not any(str(truth_dir.resolve()) in str(Path(p).resolve()) for p in manifest["image_path"])

    writers = {REPO / "flows" / "phantom.py", REPO / "flows" / "cli.py"}
    pattern = re.compile(r"phantom\.truth|phantom import .*truth|write_truth|read_truth|truth_dir|fill_truth")
    readers = [p.relative_to(REPO).as_posix() for folder in ("tasks", "flows") for p in (REPO / folder).rglob("*.py")
               if p not in writers and pattern.search(p.read_text())]
    assert readers == []
    # the phantom step writes the truth and never reads it back
    assert "read_truth" not in (REPO / "flows" / "phantom.py").read_text()


def test_cli_truth_dir_inside_the_tree_is_one_line_exit_2(tmp_path, capsys):
    from flows.cli import main

    code = main(["phantom", str(tmp_path / "soul"), "--patients", "2", "--image-size", "32",
                 "--truth-dir", str(tmp_path / "soul" / "truth")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "outside" in err, err
    assert not (tmp_path / "soul").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_cli_writes_the_truth_beside_the_tree(tmp_path, capsys):
    from flows.cli import main

    code = main(["phantom", str(tmp_path / "soul"), "--patients", "3", "--image-size", "32", "--workers", "1",
                 "--attendance", "1,0.5,0.5,0.5,0.5,0.5", "--truth-dir", str(tmp_path / "truth")])
    assert code == 0, capsys.readouterr().err
    truth = read_truth(tmp_path / "truth")
    assert truth.config.n_patients == 3 and truth.config.image_size == 32 and truth.missing_pairs()


# ------------------------------------------------------------------------------------ 1-px tolerant label metrics

def _line(shape=(32, 32), row=10, width=1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[row:row + width, 4:28] = True
    mask[4:28, 20] = True
    return mask


def test_tolerant_dice_forgives_a_one_pixel_shift_and_nothing_more():
    from brvo_models.metrics import cldice, dice, tolerant_cldice, tolerant_dice

    a = _line()
    shifted = np.roll(a, 1, axis=0)
    assert dice(a, shifted) < 0.6  # a thin vessel moved by one pixel barely overlaps
    assert tolerant_dice(a, shifted) == pytest.approx(1.0)
    assert tolerant_cldice(a, shifted) == pytest.approx(1.0)
    horizontal = np.zeros((32, 32), bool)
    horizontal[10, 4:28] = True
    assert tolerant_dice(horizontal, np.roll(horizontal, 2, axis=0)) == 0.0  # two pixels away is a miss
    # tolerance 0 is the exact metric
    rng = np.random.default_rng(0)
    p, t = rng.random((32, 32)) < 0.2, rng.random((32, 32)) < 0.2
    assert tolerant_dice(p, t, tolerance=0) == pytest.approx(dice(p, t))
    assert tolerant_cldice(p, t, tolerance=0) == pytest.approx(cldice(p, t))
    # conventions of the exact metrics: empty/empty agree, one empty side scores 0
    empty = np.zeros((32, 32), bool)
    assert tolerant_dice(empty, empty) == 1.0 and tolerant_dice(a, empty) == 0.0
    assert tolerant_cldice(empty, empty) == 1.0 and tolerant_cldice(empty, a) == 0.0


# ------------------------------------------------------------------------------------ the image biomarker

def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """As preprocess resizes an image (Lanczos)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def course_scans() -> dict[str, list[tuple[float, np.ndarray]]]:
    """(true area, one truth scan at 128 px) for every (patient, stage) of 6 patients: demo knobs, and an older
    device (contrast 0.4, noise 2)."""
    out = {}
    for name, knobs in (("demo", {}), ("contrast 0.4, noise 2", {"contrast": 0.4, "noise": 2.0})):
        config = PhantomConfig(n_patients=6, seed=1, image_size=128, **knobs)
        rows = []
        for p in range(config.n_patients):
            anat = anatomy.build_anatomy(config, p)
            for s in range(6):
                images, _ = truth_scans(config, p, s, [TRUTH_STREAM], anat)
                rows.append((anat.params.area(s), images[0]))
        out[name] = rows
    return out


@pytest.mark.parametrize("name", ["demo", "contrast 0.4, noise 2"])
@pytest.mark.parametrize("size", [64, 128])
def test_non_perfusion_index_follows_the_true_area(course_scans, name, size):
    """Across (patient, stage), the index of one scan tracks the phantom's true non-perfused area
    (measured at writing: r 0.92-0.96, slope 0.7-0.9 in percent per percent)."""
    from brvo_models.fill_truth import non_perfusion_index

    area = np.array([a for a, _ in course_scans[name]]) * 100
    index = np.array([non_perfusion_index(_resize(img, size)) for _, img in course_scans[name]])
    r = np.corrcoef(area, index)[0, 1]
    slope = np.polyfit(area, index, 1)[0]
    assert r > 0.8 and 0.4 < slope < 1.5, (r, slope)


def test_non_perfusion_index_is_scale_aware_and_reads_a_mean_image(course_scans):
    from brvo_models.fill_truth import non_perfusion_index

    scans = [img for _, img in course_scans["demo"]]
    at128 = np.array([non_perfusion_index(img) for img in scans])
    at64 = np.array([non_perfusion_index(_resize(img, 64)) for img in scans])
    assert np.abs(at128 - at64).mean() < 2.0  # percentage points
    # a mean of repeat scans (what a mean of samples is) reads like its scans
    config = PhantomConfig(n_patients=2, seed=1, image_size=64)
    images, _ = truth_scans(config, 0, 1, range(TRUTH_STREAM, TRUTH_STREAM + 8))
    per_scan = np.mean([non_perfusion_index(i) for i in images])
    assert abs(non_perfusion_index(images.astype(np.float64).mean(0)) - per_scan) < 2.0


def test_vessel_density_is_the_labelled_percentage():
    from brvo_models.fill_truth import vessel_density

    label = np.zeros((10, 10), np.uint8)
    label[2, :5] = 1
    assert vessel_density(label) == pytest.approx(5.0)
    assert vessel_density(label * 255) == pytest.approx(5.0)


# ------------------------------------------------------------------------------------ which stages a gap is judged by

@pytest.mark.parametrize("observed, stage, kind, nearest, neighbours", [
    ({0, 3}, 1, "interior", 0, (0, 3)),
    ({0, 3}, 2, "interior", 3, (0, 3)),
    ({0, 2}, 1, "interior", 0, (0, 2)),      # a tie goes to the earlier stage
    ({0, 1}, 4, "after_last", 1, (1,)),
    ({2, 3}, 0, "before_first", 2, (2,)),
])
def test_gap_kind_nearest_and_neighbours(observed, stage, kind, nearest, neighbours):
    from brvo_models.fill_truth import gap_kind, nearest_observed, neighbour_stages

    assert gap_kind(observed, stage) == kind
    assert nearest_observed(observed, stage) == nearest
    assert neighbour_stages(observed, stage) == neighbours


# ------------------------------------------------------------------------------------ the evaluation, on known answers

def _pairs(build_samples) -> list:
    """Every missed pair of TINY with its observed scans (the tree's streams) and 9 truth scans; the
    'synthetic' rows and zero-noise estimate come from ``build_samples(observed, nearest, truth)``."""
    from brvo_models.fill_truth import PairInputs, nearest_observed

    plan = plan_visits(TINY)
    out = []
    for p in range(TINY.n_patients):
        anat = anatomy.build_anatomy(TINY, p)
        seen = [s for s in range(6) if plan.attendance[p, s]]
        obs = {s: truth_scans(TINY, p, s, range(plan.exam_counts[p, s]), anat) for s in seen}
        for s in range(6):
            if s in seen:
                continue
            t_img, t_lab = truth_scans(TINY, p, s, range(TRUTH_STREAM, TRUTH_STREAM + 9), anat)
            near = obs[nearest_observed(seen, s)]
            samples, labels, zero = build_samples(near, (t_img, t_lab))
            out.append(PairInputs(
                patient_id=str(p + 1), stage=s, observed_images={k: v[0] for k, v in obs.items()},
                observed_labels={k: v[1] > 0 for k, v in obs.items()}, truth_images=t_img, truth_labels=t_lab > 0,
                samples=samples, sample_labels=labels > 0, zero_noise=zero))
    return out


def test_the_oracle_closes_the_whole_gap_and_the_true_scans_carry_the_whole_course():
    from brvo_models.fill_truth import evaluate_pair, summarise

    def truth_itself(_near, truth):
        images, labels = truth
        return images, labels, images[1:].astype(np.float64).mean(0)  # zero-noise estimate = the oracle image

    rows = [evaluate_pair(p) for p in _pairs(truth_itself)]
    summary = summarise(rows)
    kinds = {r["kind"] for r in rows}
    assert {"interior", "after_last"} <= kinds and set(summary) == kinds | {"all"}
    for kind in kinds | {"all"}:
        s = summary[kind]
        assert s["n_pairs"] == sum(r["kind"] == kind for r in rows) or kind == "all"
        # the oracle closes the whole gap wherever there is one (at 32 px a copy can beat the blurred mean
        # of 8 shifted scans on a single pair: then the share is undefined, not a number)
        best = max(s["ssim"]["nearest_copy"], s["ssim"]["neighbour_mean"])
        if s["ssim"]["oracle"] > best:
            assert s["gap_closed"]["zero_noise"] == pytest.approx(1.0)
        else:
            assert s["gap_closed"]["zero_noise"] is None
        assert s["ssim"]["oracle"] > s["ssim"]["repeat_scan"]  # averaging 8 scans beats one
        course = s["course"]["non_perfusion"]["samples"]
        assert course["slope_through_origin"] == pytest.approx(1.0)
        assert course["offset"] == pytest.approx(0.0, abs=1e-9) and course["mae"] == pytest.approx(0.0, abs=1e-9)
        assert s["course"]["vessel_density"]["samples"]["mae"] == pytest.approx(0.0, abs=1e-9)
        assert s["labels"]["samples"]["tolerant_dice"] < 1.0  # 8 of the 9 samples are other scans
    assert summary["all"]["n_pairs"] == len(rows)
    assert summary["all"]["gap_closed"]["zero_noise"] == pytest.approx(1.0)
    assert summary["after_last"]["gap_closed"]["zero_noise"] == pytest.approx(1.0)
    # one true scan as the samples: SSIM 1 and the labels agree exactly
    rows = [evaluate_pair(p) for p in _pairs(lambda _near, t: (t[0][:1].repeat(3, 0), t[1][:1].repeat(3, 0), None))]
    summary = summarise(rows)["all"]
    assert summary["ssim"]["one_sample"] == pytest.approx(1.0) and summary["ssim"]["mean_of_samples"] == pytest.approx(1.0)
    assert summary["labels"]["samples"]["tolerant_dice"] == 1.0
    assert summary["labels"]["samples"]["tolerant_cldice"] == pytest.approx(1.0)
    assert summary["gap_closed"]["mean_of_samples"] > 1.0  # the true scan is closer than any estimate can be
    assert summary["ssim"]["zero_noise"] is None and summary["gap_closed"]["zero_noise"] is None


def test_a_copy_of_the_nearest_visit_carries_none_of_the_course():
    from brvo_models.fill_truth import evaluate_pair, summarise

    def nearest_copy(near, _truth):
        images, labels = near
        reps = -(-4 // len(images))
        return np.tile(images, (reps, 1, 1))[:4], np.tile(labels, (reps, 1, 1))[:4], images.astype(np.float64).mean(0)

    rows = [evaluate_pair(p) for p in _pairs(nearest_copy)]
    for kind, s in summarise(rows).items():
        for biomarker in ("non_perfusion", "vessel_density"):
            course = s["course"][biomarker]
            assert course["samples"]["slope_through_origin"] == pytest.approx(0.0, abs=1e-12)
            assert course["samples"]["mae"] == pytest.approx(course["nearest_copy"]["mae"])
            assert course["samples"]["offset"] == pytest.approx(course["nearest_copy"]["offset"])
            assert course["nearest_copy"]["offset"] == pytest.approx(-course["true_change_mean"])
        assert s["ssim"]["zero_noise"] == pytest.approx(s["ssim"]["nearest_copy"])  # the copy is the mean image
        best = max(s["ssim"]["nearest_copy"], s["ssim"]["neighbour_mean"])
        if s["ssim"]["oracle"] > best:
            assert s["gap_closed"]["zero_noise"] == pytest.approx(
                (s["ssim"]["nearest_copy"] - best) / (s["ssim"]["oracle"] - best))
        assert s["gap_closed"]["zero_noise"] is None or s["gap_closed"]["zero_noise"] <= 1e-12
        assert s["labels"]["samples"]["tolerant_dice"] == pytest.approx(s["labels"]["nearest_copy"]["tolerant_dice"])
    # the true course of this phantom is not flat: a copy misses it
    assert summarise(rows)["all"]["course"]["non_perfusion"]["true_change_mean"] < -1.0


def test_bars_hold_for_the_truth_and_fail_for_a_copy():
    """The issue's rules, on the two fakes with known answers: the truth itself meets the estimate, course
    and label bars; a copy of the nearest visit misses the course bar on both judged kinds."""
    from brvo_models.fill_truth import bars, evaluate_pair, summarise

    def truth_itself(_near, truth):
        images, labels = truth
        return images, labels, images[1:].astype(np.float64).mean(0)

    met = bars(summarise([evaluate_pair(p) for p in _pairs(truth_itself)]))
    assert met["after_last.estimate"]["met"] is True and met["after_last.course"]["met"] is True
    assert met["interior.course"]["met"] is True

    def nearest_copy(near, _truth):
        images, labels = near
        return np.tile(images, (2, 1, 1)), np.tile(labels, (2, 1, 1)), images.astype(np.float64).mean(0)

    missed = bars(summarise([evaluate_pair(p) for p in _pairs(nearest_copy)]))
    assert missed["after_last.course"]["met"] is False and missed["interior.course"]["met"] is False
    assert missed["after_last.course"]["value"]["carried"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_benchmark_judges_every_filled_pair_of_a_finished_run(tiny_augment_run, tmp_path, capsys):
    """benchmarks/fill_truth.py on the session's tiny run (8 patients, seed 0) and a truth written for that
    phantom: every filled pair is judged, the table and a WARNING per missed bar are printed, JSON written;
    a truth of another phantom is refused in one line."""
    import json

    from storage.paired_format import read_meta
    from tasks.fill import missing_stages

    _, run_dir, result = tiny_augment_run
    bench = load_benchmark("fill_truth")

    write_truth(tmp_path / "truth", PhantomConfig(n_patients=8, seed=0), n_repeats=3)
    out = tmp_path / "fill_truth.json"
    assert bench.main([str(run_dir), str(tmp_path / "truth"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    holes = {(pid, s) for pid, stages in missing_stages(read_meta(run_dir / "soul.h5")).items() for s in stages}
    assert {(r["patient_id"], r["stage"]) for r in saved["pairs"]} == holes
    assert saved["summary"]["all"]["n_samples"] == result["n_synthetic"]
    for row in saved["pairs"]:
        assert row["n_truth_scans"] == 3 and row["ssim"]["zero_noise"] is not None
    assert "SSIM vs true scan" in printed and "after last" in printed
    missed = [name for name, bar in saved["bars"].items() if bar["met"] is not True]
    assert all(f"WARNING: fill_truth bar {name}" in printed for name in missed)
    assert "real_vs_real" in saved["distribution"]["all"]

    write_truth(tmp_path / "other", PhantomConfig(n_patients=8, seed=1), n_repeats=3)
    assert bench.main([str(run_dir), str(tmp_path / "other"), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not this run's phantom" in err and err.count("\n") == 1
