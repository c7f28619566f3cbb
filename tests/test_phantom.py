"""The built-in SOUL phantom: layout, recorded bytes, determinism, the clinic knobs, and what models learn from.

Rule for the knob tests, fixed before measuring: the same patients (same seed) are
written once with the demo's knobs and once with one knob changed; the knob passes when
its statistic, averaged over every written image, moves in the stated direction by at
least 10 % of the demo's value (the paired design leaves no other source of change).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from brvo_models.phantom import anatomy, visit_plan
from brvo_models.phantom.acquisition import acquire_exam
from brvo_models.phantom.config import SOUL_ATTENDANCE, PhantomConfig, load_phantom_config, phantom_config
from brvo_models.phantom.figure import render_timeline_figure
from brvo_models.phantom.soul_layout import MAX_EXAMS, PAPER_PATIENTS
from storage.errors import BrvoError
from storage.hashing import file_sha256, json_sha256
from storage.paired_format import STAGE_NAMES
from flows.phantom import PhantomSummary, generate_phantom, phantom_task

N_SMALL = 8

#: Content digests of phantoms written by the code before the knobs existed (main at 10c61ac;
#: Pillow 13.0.0, openpyxl 3.1.5, numpy 2.4.6, scipy 1.17.1): json_sha256 of {path: file sha256}
#: over the JPGs and over the sheet. The demo's knobs must keep reproducing them.
RECORDED = {
    # 4 patients, seed 0, 64 px
    "4x64": ("372af29ecb06c984d1930660adabec1e408a6304d84e5dfa05247b230f173f6c",
             "c38c42d0334967b2eecfb652120ded21697fee2f135a35259f8638c1d5fca7a8"),
    # 8 patients, seed 3, 304 px (the `small` fixture)
    "8x304": ("04f0ffd1e77054e1ecc4ccdc60278c5935d219eabfb69a2597e430a383c5c468",
              "34dc0a88ce27c80f75042047718b9960003fbf1431ddcdb594b99dbd9978796b"),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("phantom") / "soul"
    return out, generate_phantom(out, PhantomConfig(n_patients=N_SMALL, seed=3), workers=1)


def _tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digests(root: Path) -> tuple[str, str]:
    """(JPGs, sheet): json_sha256 of {relative path: file sha256}, 64 hex digits each."""
    files = {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    jpgs = {k: v for k, v in files.items() if k.endswith(".jpg")}
    sheet = {k: v for k, v in files.items() if not k.endswith(".jpg")}
    return json_sha256(jpgs, 64), json_sha256(sheet, 64)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _quadrant_mask(params: anatomy.PatientParams, size: int) -> np.ndarray:
    dx, dy = dict((q[0], q[1]) for q in anatomy.QUADRANTS)[params.quadrant]
    if params.eye == "OS":
        dx = -dx
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    return (np.sign(xx) == dx) & (np.sign(yy) == dy)


# --------------------------------------------------------------------------- recorded bytes and determinism

def test_demo_knobs_reproduce_the_recorded_bytes(small, tmp_path):
    generate_phantom(tmp_path / "p", PhantomConfig(n_patients=4, seed=0, image_size=64), workers=2)
    for name, root in (("4x64", tmp_path / "p"), ("8x304", small[0])):
        jpgs, sheet = _digests(root)
        assert jpgs == RECORDED[name][0], f"{name}: images/labels differ from the recorded phantom"
        assert sheet == RECORDED[name][1], f"{name}: Infomation.xlsx differs from the recorded phantom"


def test_old_keyword_call_is_the_same_phantom(tmp_path):
    """flows/augment.py calls generate_phantom(dir, n_patients=..., seed=...): the keywords are config fields."""
    generate_phantom(tmp_path / "kw", n_patients=4, seed=0, image_size=64, workers=1)
    assert _digests(tmp_path / "kw") == RECORDED["4x64"]
    # keywords replace the config's fields, the rest of the config stays
    summary = generate_phantom(tmp_path / "mixed", PhantomConfig(n_patients=9, contrast=0.5), n_patients=2,
                               image_size=64, workers=1)
    assert summary.config == PhantomConfig(n_patients=2, image_size=64, contrast=0.5)


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    generate_phantom(again, PhantomConfig(n_patients=N_SMALL, seed=3), workers=2)
    assert _tree_files(again) == _tree_files(root)  # images, labels and the xlsx
    other = tmp_path / "other"
    generate_phantom(other, PhantomConfig(n_patients=3, seed=4), workers=1)
    a = _load(next(iter(sorted(root.glob("S1/s1t1/image/*/*.jpg")))))
    b = _load(next(iter(sorted(other.glob("S1/s1t1/image/*/*.jpg")))))
    assert not np.array_equal(a, b)


def test_knobbed_phantom_is_deterministic_across_workers(tmp_path):
    config = PhantomConfig(n_patients=5, seed=2, image_size=64, images_per_visit=(1, 2), vessel_density=2.0,
                           vessel_width=1.5, contrast=0.4, noise=2.0, non_perfusion_size=2.0,
                           attendance=(1, 0.8, 0.6, 0.4, 0.4, 0.2))
    generate_phantom(tmp_path / "w1", config, workers=1)
    generate_phantom(tmp_path / "w3", config, workers=3)
    assert _tree_files(tmp_path / "w1") == _tree_files(tmp_path / "w3")


def test_refuses_non_empty_dir_and_overwrites_only_a_phantom(tmp_path):
    out = tmp_path / "soul"
    tiny = PhantomConfig(n_patients=1, image_size=64)
    generate_phantom(out, tiny, workers=1)
    with pytest.raises(BrvoError, match="not empty"):
        generate_phantom(out, tiny)
    summary = generate_phantom(out, PhantomConfig(n_patients=2, seed=1, image_size=64), overwrite=True, workers=1)
    assert len({p.name for p in out.glob("S*/s*/image/*")}) == 2 == summary.n_patients
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("x")
    with pytest.raises(BrvoError, match="refusing"):
        generate_phantom(tmp_path / "mine", tiny, overwrite=True)
    assert (tmp_path / "mine" / "thesis.docx").exists()
    with pytest.raises(BrvoError, match="workers"):
        generate_phantom(tmp_path / "x", tiny, workers=0)
    assert not list(tmp_path.glob(".*tmp-*")) and not (tmp_path / "x").exists()  # no leftovers beside the target


# --------------------------------------------------------------------------- out-of-range values

@pytest.mark.parametrize("field, value", [
    ("n_patients", 0), ("n_patients", 10_001), ("seed", -1), ("image_size", 16), ("image_size", 4096),
    ("images_per_visit", (0, 2)), ("images_per_visit", (3, 1)), ("images_per_visit", (1, 9)),
    ("images_per_visit", "a-b"), ("images_per_visit", [1, 2, 3]),
    ("attendance", (1, 1, 1, 1, 1)), ("attendance", (1, 1, 1, 1, 1, 0)), ("attendance", (1, 1, 1, 1, 1, 1.5)),
    ("attendance", "1,x,1,1,1,1"),
    ("vessel_density", 0.1), ("vessel_density", 3.5), ("vessel_width", 0.2), ("vessel_width", 3.0),
    ("contrast", -0.1), ("contrast", 1.6), ("noise", -1.0), ("noise", 4.0),
    ("non_perfusion_size", -0.5), ("non_perfusion_size", 3.5), ("colour", 1),
])
def test_out_of_range_value_is_a_one_line_error_naming_the_field(tmp_path, field, value):
    with pytest.raises(BrvoError) as err:
        generate_phantom(tmp_path / "x", phantom_config(**{field: value}))
    message = str(err.value)
    assert "\n" not in message and field in message, message
    assert not (tmp_path / "x").exists()
    # the same value in a config file: the file's name and the field, on one line
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(BrvoError) as err:
        load_phantom_config(path)
    assert "\n" not in str(err.value) and field in str(err.value) and "bad.json" in str(err.value)


def test_config_file_round_trips_and_accepts_command_line_spellings(tmp_path):
    config = PhantomConfig(n_patients=24, images_per_visit="1-2", attendance="1,0.7,0.5,0.3,0.2,0.1", contrast=0.5)
    assert config.images_per_visit == (1, 2) and config.attendance == (1, 0.7, 0.5, 0.3, 0.2, 0.1)
    path = tmp_path / "c.json"
    path.write_text(config.model_dump_json())
    assert load_phantom_config(path) == config
    path.write_text('{"noise": 0.5}')
    assert load_phantom_config(path) == PhantomConfig(noise=0.5)  # fields not in the file keep the demo's
    assert PhantomConfig().attendance == tuple(c / 53 for c in PAPER_PATIENTS)
    with pytest.raises(Exception):
        config.noise = 2.0  # frozen: a config is a value


# --------------------------------------------------------------------------- visit plan: attendance and scans

def test_stage_counts_follow_the_paper_at_53():
    att = visit_plan.plan_attendance(53, seed=0)
    assert tuple(att.sum(axis=0)) == PAPER_PATIENTS
    assert att.any(axis=1).all()
    assert att.all(axis=1).any()
    exams = visit_plan.plan_exam_counts(att, seed=0)
    assert ((exams >= 1) & (exams <= MAX_EXAMS))[att].all() and (exams[~att] == 0).all()
    assert 850 <= exams.sum() <= 1150  # SOUL has 1023
    per_stage = exams.sum(axis=0)
    assert per_stage[0] > per_stage[5] and per_stage[1] > per_stage[4]


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10, 26, 80])
def test_attendance_scales_and_covers_every_patient(n):
    att = visit_plan.plan_attendance(n, seed=1)
    assert att.any(axis=1).all()
    counts = att.sum(axis=0)
    expected = visit_plan.stage_patient_counts(n)
    if n >= 3:
        assert tuple(counts) == expected and min(counts) >= 1
        assert counts[0] >= counts[5]
    assert np.array_equal(att, visit_plan.plan_attendance(n, seed=1))


def test_attendance_knob_sets_the_patients_per_stage():
    fast = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)
    plan = visit_plan.plan_visits(PhantomConfig(n_patients=40, attendance=fast))
    assert tuple(plan.attendance.sum(axis=0)) == (40, 32, 24, 16, 8, 4)  # share x patients, rounded
    assert plan.attendance.any(axis=1).all() and plan.attendance.all(axis=1).any()
    soul = visit_plan.plan_visits(PhantomConfig(n_patients=40))
    assert tuple(soul.attendance.sum(axis=0)) == tuple(round(s * 40) for s in SOUL_ATTENDANCE)
    # a faster fall-off leaves fewer patients and images in the last stages than SOUL's
    assert plan.attendance[:, 5].sum() < soul.attendance[:, 5].sum()
    assert plan.exam_counts[:, 4:].sum() < soul.exam_counts[:, 4:].sum()
    # everyone at every stage is allowed
    full = visit_plan.plan_visits(PhantomConfig(n_patients=7, attendance=(1,) * 6))
    assert full.attendance.all()


@pytest.mark.parametrize("lo, hi", [(1, 2), (3, 8), (4, 4), (1, 8)])
def test_images_per_visit_stay_in_the_range(lo, hi):
    plan = visit_plan.plan_visits(PhantomConfig(n_patients=53, images_per_visit=(lo, hi)))
    attended = plan.exam_counts[plan.attendance]
    assert attended.min() >= lo and attended.max() <= hi
    assert (plan.exam_counts[~plan.attendance] == 0).all()
    if hi > lo:
        assert attended.min() == lo or attended.max() == hi  # the range is used, not one value of it
    ids = [e for stages in plan.exam_ids for stage in stages for e in stage]
    assert len(ids) == len(set(ids)) == plan.n_images


def test_images_per_visit_knob_changes_the_dataset_size():
    few = visit_plan.plan_visits(PhantomConfig(images_per_visit=(1, 2)))
    many = visit_plan.plan_visits(PhantomConfig(images_per_visit=(3, 8)))
    soul = visit_plan.plan_visits(PhantomConfig())
    assert few.n_images < 2 * 53 * 6 and few.n_images < soul.n_images < many.n_images
    assert np.array_equal(few.attendance, soul.attendance)  # the same visits, other scan counts


# --------------------------------------------------------------------------- knobs: written images change as stated

KNOB_BASE = dict(n_patients=5, seed=0, image_size=128)
KNOBS = {"demo": {}, "dense": {"vessel_density": 2.5}, "sparse": {"vessel_density": 0.3},
         "wide": {"vessel_width": 2.0}, "thin": {"vessel_width": 0.6},
         "flat": {"contrast": 0.3}, "punchy": {"contrast": 1.5},
         "clean": {"noise": 0.0}, "noisy": {"noise": 2.5},
         "no_np": {"non_perfusion_size": 0.0}, "big_np": {"non_perfusion_size": 2.5}}


def _image_stats(root: Path) -> dict[str, float]:
    """Per-image statistics averaged over every image of the tree."""
    label_density, contrast, grain, brightness, first_stage = [], [], [], [], []
    for path in sorted(root.glob("S*/s*/image/*/*.jpg")):
        img = _load(path).astype(float)
        lbl = _load(path.parents[2] / "label" / path.parent.name / path.name) >= 127
        label_density.append(lbl.mean())
        contrast.append(img[lbl].mean() - img[~lbl].mean())
        grain.append((img - ndimage.gaussian_filter(img, 1.5)).std())  # fine-scale texture: speckle and noise
        brightness.append(img.mean())
        if path.parents[2].name == "s1t1":
            first_stage.append(img.mean())
    return {"label_density": float(np.mean(label_density)), "contrast": float(np.mean(contrast)),
            "grain": float(np.mean(grain)), "brightness": float(np.mean(brightness)),
            "brightness_s1t1": float(np.mean(first_stage))}


@pytest.fixture(scope="module")
def knob_stats(tmp_path_factory) -> dict[str, dict[str, float]]:
    base = tmp_path_factory.mktemp("knobs")
    out = {}
    for name, knob in KNOBS.items():
        generate_phantom(base / name, PhantomConfig(**KNOB_BASE, **knob), workers=2)
        out[name] = _image_stats(base / name)
        out[name]["labels"] = json_sha256(
            {p.relative_to(base / name).as_posix(): file_sha256(p)
             for p in sorted((base / name).glob("S*/s*/label/*/*.jpg"))}, 64)
    return out


def _moves(stats, name: str, key: str, direction: int) -> None:
    demo, other = stats["demo"][key], stats[name][key]
    assert direction * (other - demo) >= 0.10 * abs(demo), (name, key, demo, other)


def test_vessel_density_and_width_raise_the_label_density(knob_stats):
    _moves(knob_stats, "dense", "label_density", +1)
    _moves(knob_stats, "sparse", "label_density", -1)
    _moves(knob_stats, "wide", "label_density", +1)
    _moves(knob_stats, "thin", "label_density", -1)


def test_contrast_sets_how_far_vessels_stand_out_and_leaves_labels_alone(knob_stats):
    _moves(knob_stats, "flat", "contrast", -1)
    _moves(knob_stats, "punchy", "contrast", +1)
    assert knob_stats["flat"]["labels"] == knob_stats["demo"]["labels"] == knob_stats["punchy"]["labels"]


def test_noise_sets_the_grain_and_leaves_labels_alone(knob_stats):
    _moves(knob_stats, "clean", "grain", -1)
    _moves(knob_stats, "noisy", "grain", +1)
    _moves(knob_stats, "noisy", "contrast", -1)  # noise buries vessels: the mean contrast falls too
    assert knob_stats["clean"]["labels"] == knob_stats["demo"]["labels"] == knob_stats["noisy"]["labels"]


def test_non_perfusion_size_darkens_the_images(knob_stats):
    """At the first stage, before patients reperfuse, the non-perfused sector is at its largest."""
    _moves(knob_stats, "big_np", "brightness_s1t1", -1)
    assert knob_stats["big_np"]["brightness"] < knob_stats["demo"]["brightness"] < knob_stats["no_np"]["brightness"]


def test_non_perfusion_size_scales_the_non_perfused_fraction():
    fractions = {}
    for scale in (0.0, 1.0, 2.5):
        config = PhantomConfig(**KNOB_BASE, non_perfusion_size=scale)
        fractions[scale] = np.array([anatomy.non_perfused_fraction(anatomy.build_anatomy(config, i), 0)
                                     for i in range(KNOB_BASE["n_patients"])])
    assert (fractions[0.0] == 0).all()
    assert (fractions[1.0] > 0.03).all()
    # area x 2.5 per patient (quantile steps on a 128 px grid leave a few per cent of slack)
    np.testing.assert_allclose(fractions[2.5], 2.5 * fractions[1.0], rtol=0.05)


def test_vessel_density_changes_only_the_vessels():
    """A controlled knob: the patient's FAZ, capillary mesh and non-perfusion sector stay the patient's own."""
    demo = anatomy.build_anatomy(PhantomConfig(**KNOB_BASE), 1)
    dense = anatomy.build_anatomy(PhantomConfig(**KNOB_BASE, vessel_density=2.0), 1)
    assert demo.params == dense.params
    for field in ("mesh", "faz", "np_field", "shade"):
        assert np.array_equal(getattr(demo, field), getattr(dense, field)), field
    assert len(dense.segs_px) > len(demo.segs_px)


def test_noise_zero_is_a_clean_shifted_copy_of_the_stage():
    config = PhantomConfig(**KNOB_BASE)
    anat = anatomy.build_anatomy(config, 0)
    stage_img, stage_lbl = anatomy.render_stage(anat, 0)
    img, _ = acquire_exam(stage_img, stage_lbl, config.image_size, anat.pad, np.random.default_rng(5), noise=0.0)
    noisy, _ = acquire_exam(stage_img, stage_lbl, config.image_size, anat.pad, np.random.default_rng(5), noise=1.0)
    crops = [stage_img[oy:oy + 128, ox:ox + 128] for oy in range(2 * anat.pad + 1) for ox in range(2 * anat.pad + 1)]
    # clean: the stage times a gain of 0.96..1.04, rounded; nothing else
    assert min(np.abs(img - np.clip(np.rint(c * (img.mean() / c.mean())), 0, 255)).mean() for c in crops) < 1.0
    # same stream, same shift and gain: what noise 1 adds is the speckle, the additive noise and motion lines
    assert np.abs(noisy.astype(float) - img).mean() > 5.0


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
            assert 1 <= sum(1 for q in image_files if q.parent.name == pid) <= MAX_EXAMS
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
    assert summary.config == PhantomConfig(n_patients=N_SMALL, seed=3)


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


# --------------------------------------------------------------------------- what the models learn

def _responders(seed: int, k: int) -> list[int]:
    out = []
    for idx in range(40):
        p = anatomy.sample_params(np.random.default_rng([seed, idx]))
        if p.rate > 0.3 and p.extent0 > 0.75:
            out.append(idx)
        if len(out) == k:
            return out
    raise AssertionError("no strong responders among 40 patients")


def test_non_perfusion_sector_reperfuses_over_stages():
    config = PhantomConfig(seed=0)
    for idx in _responders(seed=0, k=3):
        anat = anatomy.build_anatomy(config, idx)
        pad, size = anat.pad, anat.size
        quad = _quadrant_mask(anat.params, size)
        stats = []
        for stage in (0, 5):
            img, lbl = anatomy.render_stage(anat, stage)
            img, lbl = img[pad:pad + size, pad:pad + size], lbl[pad:pad + size, pad:pad + size]
            stats.append((lbl[quad].mean(), img[quad].mean()))
        (dens0, bright0), (dens5, bright5) = stats
        assert dens5 > dens0 * 1.05, (idx, dens0, dens5)      # small vessels come back into the label
        assert bright5 > bright0 * 1.05, (idx, bright0, bright5)  # and capillaries into the image


def test_patients_differ_and_repeat_scans_are_close(small):
    root, _ = small
    visits = sorted(root.glob("S1/s1t1/image/*"))
    repeated = [d for d in visits if len(list(d.glob("*.jpg"))) >= 2]
    assert repeated and len(visits) >= 2, "the 8-patient phantom has a visit with two scans and two patients"
    first, second = (_load(p).astype(float) for p in sorted(repeated[0].glob("*.jpg"))[:2])
    other = next(d for d in visits if d != repeated[0])
    between = np.abs(first - _load(sorted(other.glob("*.jpg"))[0]).astype(float)).mean()
    within = np.abs(first - second).mean()
    assert within < 0.8 * between, (within, between)


def test_images_look_like_octa(small):
    root, _ = small
    config = PhantomConfig(n_patients=N_SMALL, seed=3)
    for path in sorted(root.glob("S1/s1t1/image/*/*.jpg"))[:6]:
        pid = int(path.parent.name)
        anat = anatomy.build_anatomy(config, pid - 1)
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
    out = render_timeline_figure(root, summary.full_timeline_patients[0], tmp_path / "tl.png")
    im = Image.open(out)
    assert im.size[0] > 2 * im.size[1] > 300
    partial = [p.name for p in root.glob("S1/s1t1/image/*") if p.name not in summary.full_timeline_patients]
    assert partial, "the 8-patient phantom has a patient who misses a stage"
    render_timeline_figure(root, partial[0], tmp_path / "partial.png")
    with pytest.raises(BrvoError):
        render_timeline_figure(root, "999", tmp_path / "none.png")


def test_phantom_task_wraps_the_function(tmp_path):
    from prefect import Task

    assert isinstance(phantom_task, Task)
    summary = phantom_task.fn(tmp_path / "soul", PhantomConfig(n_patients=2, image_size=64, noise=0.5), workers=1)
    assert summary.n_patients == 2 and summary.config.noise == 0.5
    assert (tmp_path / "soul" / "Infomation.xlsx").exists()


def test_generator_never_imports_prefect():
    import subprocess
    import sys

    code = ("import sys, brvo_models.phantom, brvo_models.phantom.figure; "
            "sys.exit(1 if any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
