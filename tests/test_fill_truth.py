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
from tasks.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
#: 6 patients at 32 px, 1-2 scans per visit, attendance falling off: interior and after-last gaps both occur.
TINY = PhantomConfig(n_patients=6, seed=5, image_size=32, images_per_visit=(1, 2),
                     attendance=(1.0, 0.7, 0.7, 0.5, 0.4, 0.3))


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

    writers = {REPO / "tasks" / "phantom.py", REPO / "flows" / "cli.py"}
    pattern = re.compile(r"phantom\.truth|phantom import .*truth|write_truth|read_truth|truth_dir|fill_truth")
    readers = [p.relative_to(REPO).as_posix() for folder in ("tasks", "flows") for p in (REPO / folder).rglob("*.py")
               if p not in writers and pattern.search(p.read_text())]
    assert readers == []
    # the phantom step writes the truth and never reads it back
    assert "read_truth" not in (REPO / "tasks" / "phantom.py").read_text()


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
