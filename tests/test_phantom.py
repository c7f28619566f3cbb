"""The built-in SOUL phantom: layout, determinism, stage fall-off, and the properties models learn from."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage.errors import BrvoError
from storage.paired_format import STAGE_NAMES
from tasks import phantom as ph

N_SMALL = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, ph.PhantomSummary]:
    out = tmp_path_factory.mktemp("phantom") / "soul"
    return out, ph.generate_phantom(out, n_patients=N_SMALL, seed=3, workers=1)


def _tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _quadrant_mask(params: ph.PatientParams, size: int) -> np.ndarray:
    dx, dy = dict((q[0], q[1]) for q in ph.QUADRANTS)[params.quadrant]
    if params.eye == "OS":
        dx = -dx
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    return (np.sign(xx) == dx) & (np.sign(yy) == dy)


# --------------------------------------------------------------------------- layout and files

def test_layout_is_exactly_soul(small):
    root, summary = small
    assert sorted(p.name for p in root.iterdir()) == ["Infomation.xlsx", "S1", "S2", "S3"]
    names_seen = set()
    for s, name in enumerate(STAGE_NAMES):
        group = root / f"S{s // 2 + 1}"
        assert (group / name).is_dir()
        assert sorted(p.name for p in (group / name).iterdir()) == ["image", "label"]
        image_files = sorted((group / name / "image").glob("*/*"))
        label_files = sorted((group / name / "label").glob("*/*"))
        assert len(image_files) == summary.images_per_stage[name]
        assert len({p.parent.name for p in image_files}) == summary.patients_per_stage[name]
        # every image has its twin label, same patient folder and file name, and vice versa
        assert [p.relative_to(group / name / "image") for p in image_files] == \
               [p.relative_to(group / name / "label") for p in label_files]
        for p in image_files:
            pid = p.parent.name
            assert re.fullmatch(r"[1-9][0-9]*", pid) and 1 <= int(pid) <= N_SMALL
            m = re.fullmatch(rf"{pid}_([0-9]+)\.jpg", p.name)
            assert m, p.name
            assert 1 <= sum(1 for q in image_files if q.parent.name == pid) <= ph.MAX_EXAMS
            names_seen.add(m.group(1))
    assert len(names_seen) == summary.n_images  # exam ids are unique across the whole tree
    for stage_group in ("S1", "S2", "S3"):
        assert len(list((root / stage_group).iterdir())) == 2


def test_images_and_labels_are_304_grayscale_and_labels_binary(small):
    root, _ = small
    images = sorted(root.glob("S*/s*/image/*/*.jpg"))
    for path in images[::7]:
        img = Image.open(path)
        lbl = Image.open(path.parents[2] / "label" / path.parent.name / path.name)
        assert img.format == "JPEG" and img.mode == "L" and img.size == (304, 304)
        assert lbl.format == "JPEG" and lbl.mode == "L" and lbl.size == (304, 304)
        lab = np.asarray(lbl)
        # JPEG-lossy 0/255, like SOUL: almost every pixel is far from the 127 threshold
        assert np.mean((lab > 40) & (lab < 215)) < 0.03
        assert 0.03 < np.mean(lab >= 127) < 0.4


def test_every_patient_has_images_and_summary_matches(small):
    root, summary = small
    pids = {p.name for p in root.glob("S*/s*/image/*")}
    assert pids == {str(i) for i in range(1, N_SMALL + 1)}
    assert summary.n_images == sum(summary.images_per_stage.values()) == len(list(root.glob("S*/s*/image/*/*.jpg")))
    assert summary.full_timeline_patients  # the most retained patient attends all six stages


def test_clinical_sheet_has_both_sheets_matching_the_files(small):
    root, summary = small
    sheets = pd.read_excel(root / "Infomation.xlsx", sheet_name=None)
    assert set(sheets) == {"basic_info", "image_info"}
    basic, info = sheets["basic_info"], sheets["image_info"]
    assert sorted(basic["SubID"]) == list(range(1, N_SMALL + 1))
    assert {"SubID", "Gender", "Age", "Eye"} <= set(basic.columns)
    assert set(basic["Eye"]) <= {"OD", "OS"}
    assert len(info) == summary.n_images
    files = {(p.parents[2].name, p.name) for p in root.glob("S*/s*/image/*/*.jpg")}
    assert set(zip(info["Subset"], info["ImageName"])) == files
    # visits happen in treatment order for every patient
    order = info.assign(stage=info["Subset"].map(STAGE_NAMES.index)).groupby(["SubID", "stage"])["ExamDate"].min()
    for _, dates in order.groupby(level=0):
        assert dates.is_monotonic_increasing


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_any_workers_and_other_seed_differs(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    ph.generate_phantom(again, n_patients=N_SMALL, seed=3, workers=2)
    assert _tree_files(again) == _tree_files(root)  # images, labels and the xlsx
    other = tmp_path / "other"
    ph.generate_phantom(other, n_patients=3, seed=4, workers=1)
    a = _load(next(iter(sorted(root.glob("S1/s1t1/image/*/*.jpg")))))
    b = _load(next(iter(sorted(other.glob("S1/s1t1/image/*/*.jpg")))))
    assert not np.array_equal(a, b)


def test_refuses_non_empty_dir_and_overwrites_only_a_phantom(tmp_path):
    out = tmp_path / "soul"
    ph.generate_phantom(out, n_patients=1, seed=0, image_size=64, workers=1)
    with pytest.raises(BrvoError, match="not empty"):
        ph.generate_phantom(out, n_patients=1, seed=0, image_size=64)
    summary = ph.generate_phantom(out, n_patients=2, seed=1, image_size=64, overwrite=True, workers=1)
    assert len({p.name for p in out.glob("S*/s*/image/*")}) == 2 == summary.n_patients
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("x")
    with pytest.raises(BrvoError, match="refusing"):
        ph.generate_phantom(tmp_path / "mine", n_patients=1, overwrite=True)
    assert (tmp_path / "mine" / "thesis.docx").exists()
    with pytest.raises(BrvoError):
        ph.generate_phantom(tmp_path / "x", n_patients=0)
    assert not list(tmp_path.glob(".*tmp-*"))  # no leftovers beside the target


# --------------------------------------------------------------------------- attendance plan (pure)

def test_stage_counts_follow_the_paper_at_53():
    att = ph.plan_attendance(53, seed=0)
    assert tuple(att.sum(axis=0)) == ph.PAPER_PATIENTS
    assert att.any(axis=1).all()
    assert att.all(axis=1).any()
    exams = ph.plan_exam_counts(att, seed=0)
    assert ((exams >= 1) & (exams <= ph.MAX_EXAMS))[att].all() and (exams[~att] == 0).all()
    assert 850 <= exams.sum() <= 1150  # SOUL has 1023
    per_stage = exams.sum(axis=0)
    assert per_stage[0] > per_stage[5] and per_stage[1] > per_stage[4]


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10, 26, 80])
def test_attendance_scales_and_covers_every_patient(n):
    att = ph.plan_attendance(n, seed=1)
    assert att.any(axis=1).all()
    counts = att.sum(axis=0)
    expected = ph.stage_patient_counts(n)
    if n >= 3:
        assert tuple(counts) == expected and min(counts) >= 1
        assert counts[0] >= counts[5]
    assert np.array_equal(att, ph.plan_attendance(n, seed=1))


# --------------------------------------------------------------------------- what the models learn

def _responders(seed: int, k: int) -> list[int]:
    out = []
    for idx in range(40):
        p = ph.sample_params(np.random.default_rng([seed, idx]))
        if p.rate > 0.3 and p.extent0 > 0.75:
            out.append(idx)
        if len(out) == k:
            return out
    raise AssertionError("no strong responders among 40 patients")


def test_non_perfusion_sector_reperfuses_over_stages():
    for idx in _responders(seed=0, k=3):
        anat = ph.build_anatomy(0, idx, 304)
        pad, size = anat.pad, anat.size
        quad = _quadrant_mask(anat.params, size)
        stats = []
        for stage in (0, 5):
            img, lbl = ph.render_stage(anat, stage)
            img, lbl = img[pad:pad + size, pad:pad + size], lbl[pad:pad + size, pad:pad + size]
            stats.append((lbl[quad].mean(), img[quad].mean()))
        (dens0, bright0), (dens5, bright5) = stats
        assert dens5 > dens0 * 1.05, (idx, dens0, dens5)      # small vessels come back into the label
        assert bright5 > bright0 * 1.05, (idx, bright0, bright5)  # and capillaries into the image


def test_patients_differ_and_repeat_scans_are_close(small):
    root, _ = small
    s1 = sorted(root.glob("S1/s1t1/image/*"))
    firsts = [_load(sorted(d.glob("*.jpg"))[0]).astype(float) for d in s1[:2]]
    repeats = [_load(p).astype(float) for p in sorted(s1[0].glob("*.jpg"))]
    assert len(repeats) >= 2 or len(list(s1[1].glob("*.jpg"))) >= 1
    between = np.abs(firsts[0] - firsts[1]).mean()
    if len(repeats) >= 2:
        within = np.abs(repeats[0] - repeats[1]).mean()
        assert within < between


def test_images_look_like_octa(small):
    root, _ = small
    for path in sorted(root.glob("S1/s1t1/image/*/*.jpg"))[:6]:
        pid = int(path.parent.name)
        anat = ph.build_anatomy(3, pid - 1, 304)
        img = _load(path).astype(float)
        lbl = _load(path.parents[2] / "label" / path.parent.name / path.name) >= 127
        fx, fy = anat.fovea_px
        if anat.params.eye == "OS":
            fx = 304 - fx
        yy, xx = np.mgrid[0:304, 0:304]
        r = np.hypot(xx + 0.5 - fx, yy + 0.5 - fy) / (anat.params.faz_mm * 304 / 6)
        faz, ring = np.median(img[r < 0.5]), np.median(img[(r > 2.5) & (r < 4)])  # robust to a motion line
        assert faz < 0.6 * ring, (path.name, faz, ring)          # dark foveal avascular zone
        assert 30 < img.mean() < 160 and img.std() > 25            # not flat, not saturated
        assert img[lbl].mean() > 1.8 * img[~lbl].mean()            # vessels are the bright structures
        # the capillary mesh: plenty of texture off the labelled vessels, away from the FAZ
        assert img[~lbl & (r > 2)].std() > 15


def test_labels_follow_their_image_shift(small):
    root, _ = small
    path = sorted(root.glob("S1/s1t2/image/*/*.jpg"))[0]
    img = _load(path).astype(float)
    lbl = _load(path.parents[2] / "label" / path.parent.name / path.name) >= 127
    def score(dy: int, dx: int) -> float:
        return img[np.roll(lbl, (dy, dx), axis=(0, 1))].mean()
    aligned = score(0, 0)
    assert all(aligned > score(dy, dx) for dy, dx in [(3, 0), (-3, 0), (0, 3), (0, -3)])


# --------------------------------------------------------------------------- figure and task

def test_timeline_figure(small, tmp_path):
    root, summary = small
    out = ph.render_timeline_figure(root, summary.full_timeline_patients[0], tmp_path / "tl.png")
    im = Image.open(out)
    assert im.size[0] > 2 * im.size[1] > 300
    partial = [p.name for p in root.glob("S1/s1t1/image/*") if p.name not in summary.full_timeline_patients]
    if partial:
        ph.render_timeline_figure(root, partial[0], tmp_path / "partial.png")
    with pytest.raises(BrvoError):
        ph.render_timeline_figure(root, "999", tmp_path / "none.png")


def test_phantom_task_wraps_the_function(tmp_path):
    from prefect import Task

    assert isinstance(ph.phantom_task, Task)
    summary = ph.phantom_task.fn(tmp_path / "soul", n_patients=2, seed=0, image_size=64, workers=1)
    assert summary.n_patients == 2 and (tmp_path / "soul" / "Infomation.xlsx").exists()
