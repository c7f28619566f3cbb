"""Ingest: SOUL trees and manifest CSVs built in tmp_path with tiny PIL images.

Every bad-input case checks both the outcome for the bad file and that its
valid neighbours (same patient folder) still reach manifest.csv.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage.errors import InputDataError
from tasks.ingest import MANIFEST_COLUMNS, check_source, ingest

STAGES = ("s1t1", "s1t2", "s2t1", "s2t2", "s3t1", "s3t2")


def _image(seed: int, size=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(size[::-1]) * 200 + 20).astype(np.uint8)


def _label(seed: int, size=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    lab = np.zeros(size[::-1], np.uint8)
    lab[rng.integers(0, size[1], 4), :] = 255
    return lab


def kind_dir(root: Path, stage: str, kind: str, pid: str) -> Path:
    d = root / stage[:2].upper() / stage / kind / pid
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_pair(root: Path, stage: str, pid: str, exam: str, size=(32, 32),
               seed: int | None = None) -> tuple[Path, Path]:
    seed = zlib.crc32(f"{stage}/{pid}/{exam}".encode()) if seed is None else seed  # distinct, deterministic
    img = kind_dir(root, stage, "image", pid) / f"{pid}_{exam}.jpg"
    lab = kind_dir(root, stage, "label", pid) / f"{pid}_{exam}.jpg"
    Image.fromarray(_image(seed, size)).save(img, quality=95)
    Image.fromarray(_label(seed, size)).save(lab, quality=95)
    return img, lab


def base_tree(root: Path) -> set[tuple[str, str, str]]:
    """Patients 2, 10, 1 (numeric sort matters) with a few exams; returns {(pid, stage, exam)}."""
    plan = {"1": {"s1t1": ["101", "102"], "s2t1": ["103"]},
            "2": {"s1t1": ["201"], "s1t2": ["202", "203"], "s3t2": ["204"]},
            "10": {"s1t1": ["1001"], "s2t2": ["1002"], "s3t1": ["1003"]}}
    made = set()
    for pid, stages in plan.items():
        for stage, exams in stages.items():
            for exam in exams:
                write_pair(root, stage, pid, exam)
                made.add((pid, stage, exam))
    return made


def run(src: Path, run_dir: Path, **kw):
    lines: list[str] = []
    result = ingest(src, run_dir, log=lines.append, **kw)
    manifest = pd.read_csv(run_dir / "manifest.csv", dtype={"patient_id": str, "exam_id": str},
                           keep_default_na=False)
    quarantine = pd.read_csv(run_dir / "quarantine.csv", keep_default_na=False)
    return result, manifest, quarantine, "\n".join(lines)


def keys(manifest: pd.DataFrame) -> set[tuple[str, str, str]]:
    return set(zip(manifest.patient_id, manifest.stage_name, manifest.exam_id))


def reasons(quarantine: pd.DataFrame) -> dict[str, str]:
    return dict(zip(quarantine.path, quarantine.reason))


# ---------------------------------------------------------------------------- the good path

def test_clean_tree_writes_manifest_counts_and_summary(tmp_path):
    root = tmp_path / "soul"
    expected = base_tree(root)
    write_pair(root, "s1t1", "3", "301", size=(40, 24))  # non-square sizes are recorded as read
    expected.add(("3", "s1t1", "301"))
    result, manifest, quarantine, log = run(root, tmp_path / "run")

    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert keys(manifest) == expected and quarantine.empty
    assert list(dict.fromkeys(manifest.patient_id)) == ["1", "2", "3", "10"]  # numeric, not lexical
    for _, group in manifest.groupby("patient_id", sort=False):
        assert list(group.stage) == sorted(group.stage)
    assert (manifest.stage_name == [STAGES[s] for s in manifest.stage]).all()
    assert (manifest.subset == manifest.stage_name).all()
    for col in ("image_path", "label_path"):
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest[col])
    row = manifest[manifest.exam_id == "301"].iloc[0]
    assert (row.width, row.height) == (40, 24) and row.label_path.endswith("label/3/3_301.jpg")

    table = pd.read_csv(tmp_path / "run" / "stage_counts.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert list(table.columns) == [*STAGES, "total"]
    assert table.loc["2"].tolist() == [1, 2, 0, 0, 0, 1, 4]
    assert table.loc["total", "total"] == len(manifest) == result.n_images == 11
    assert result.counts["10"]["s2t2"] == 1 and result.n_patients == 4
    assert result.per_stage["s1t1"] == {"patients": 4, "images": 5}
    assert "s1t1" in log and "patients" in log  # the table is printed
    summary = json.loads((tmp_path / "run" / "ingest.json").read_text())
    assert summary["n_images"] == 11 and summary["clinical"]["status"] == "missing"
    assert any("Infomation.xlsx" in w for w in result.warnings)

    # one thread or several: same manifest
    _, serial, _, _ = run(root, tmp_path / "run1", workers=1)
    pd.testing.assert_frame_equal(serial, manifest)


def test_nested_root_and_information_sheet_spelling(tmp_path):
    expected = base_tree(tmp_path / "download" / "SOUL")
    (tmp_path / "download" / "runs" / "old").mkdir(parents=True)  # a sibling folder that is not SOUL
    pd.DataFrame({"SubID": [1, 2, 10, 99]}).to_excel(tmp_path / "download" / "Information.xlsx",
                                                     sheet_name="basic_info", index=False)
    check_source(tmp_path / "download")
    result, manifest, _, _ = run(tmp_path / "download", tmp_path / "run")
    assert keys(manifest) == expected
    assert result.clinical["sheets"]["basic_info"] == {"status": "ok", "rows": 4, "columns": ["SubID"]}
    assert result.clinical["clinical_rows_without_images"] == ["99"]
    assert result.clinical["sheets"]["image_info"]["status"] == "missing"


# ---------------------------------------------------------------------------- bad files, each beside valid ones

def _corrupt(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    img.write_bytes(os.urandom(500))
    return {img: "not a readable image", lab: "its image was rejected (1_900.jpg)"}


def _truncated(root):
    img, lab = write_pair(root, "s1t1", "1", "900", size=(64, 64))
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return {img: "truncated", lab: "its image was rejected"}


def _zero_byte(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    lab.write_bytes(b"")
    return {lab: "empty file (0 bytes)", img: "its label was rejected"}


def _image_without_label(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    lab.unlink()
    return {img: "image without label"}


def _label_without_image(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    img.unlink()
    return {lab: "label without image"}


def _size_mismatch(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    Image.fromarray(_label(5, (40, 40))).save(lab)
    why = "image is 32x32 but its label is 40x40"
    return {img: why, lab: why}


def _unparseable_names(root):
    d = kind_dir(root, "s1t1", "image", "1")
    bad = {}
    for name in ("scan.jpg", "1_.jpg", "1-900.jpg", "1_900.txt", "x_900.jpg"):
        Image.fromarray(_image(1)).save(d / name, format="JPEG")
        bad[d / name] = "unparseable file name"
    return bad


def _pid_disagrees_with_folder(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    img2, lab2 = img.with_name("7_900.jpg"), lab.with_name("7_900.jpg")
    img.rename(img2), lab.rename(lab2)
    why = "patient id 7 in the file name disagrees with its folder 1"
    return {img2: why, lab2: why}


def _non_numeric_patient_folder(root):
    img, lab = write_pair(root, "s1t1", "P7", "900")
    why = "patient folder 'P7' is not a numeric patient id"
    return {img: why, lab: why}


def _symlink_outside_root(root):
    outside = root.parent / "elsewhere"
    outside.mkdir()
    Image.fromarray(_image(3)).save(outside / "1_900.jpg")
    img = kind_dir(root, "s1t1", "image", "1") / "1_900.jpg"
    img.symlink_to(outside / "1_900.jpg")
    Image.fromarray(_label(3)).save(kind_dir(root, "s1t1", "label", "1") / "1_900.jpg")
    lab = kind_dir(root, "s1t1", "label", "1") / "1_900.jpg"
    return {img: "symlink pointing outside the root, not followed", lab: "label without image"}


def _broken_symlink(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    img.unlink()
    img.symlink_to(root / "gone.jpg")
    return {img: "broken symlink", lab: "label without image"}


def _file_outside_patient_folder(root):
    stray = kind_dir(root, "s1t1", "image", "1").parent / "1_900.jpg"
    Image.fromarray(_image(1)).save(stray)
    return {stray: "file outside a patient folder"}


def _float_image(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    tif = img.with_suffix(".tif")
    Image.fromarray(_image(1).astype(np.float32)).save(tif)
    img.unlink()
    return {tif: "unsupported pixel mode F", lab: "its image was rejected"}


def _empty_label(root):
    img, lab = write_pair(root, "s1t1", "1", "900")
    Image.fromarray(np.ones((32, 32), np.uint8)).save(lab)  # a 0/1 mask: empty once binarised at 127
    why = "label has no pixel above 127"
    return {img: why, lab: why}


@pytest.mark.parametrize("make_bad", [
    _corrupt, _truncated, _zero_byte, _image_without_label, _label_without_image, _size_mismatch,
    _unparseable_names, _pid_disagrees_with_folder, _non_numeric_patient_folder, _symlink_outside_root,
    _broken_symlink, _file_outside_patient_folder, _float_image, _empty_label,
], ids=lambda f: f.__name__.strip("_"))
def test_bad_file_is_quarantined_and_neighbours_kept(tmp_path, make_bad):
    root = tmp_path / "soul"
    expected = base_tree(root)  # patient 1 has valid exams 101, 102 in the same s1t1 folders
    bad = make_bad(root)
    result, manifest, quarantine, log = run(root, tmp_path / "run")

    assert keys(manifest) == expected, "a valid neighbour was lost"
    got = reasons(quarantine)
    assert set(got) == {str(p) for p in bad}
    for path, why in bad.items():
        assert why in got[str(path)], got[str(path)]
    assert result.n_quarantined == len(bad) and "quarantined" in log
    assert "900" not in set(manifest.exam_id)


def test_rgb_rgba_are_kept_and_read_as_luminance(tmp_path):
    root = tmp_path / "soul"
    expected = base_tree(root)
    img, lab = write_pair(root, "s1t1", "1", "900")
    rgb = np.dstack([_image(1), _image(2), _image(3)])
    Image.fromarray(rgb).save(img, quality=100)
    png = img.with_suffix(".png")  # RGBA: alpha must be dropped, not blended
    img.unlink()
    Image.fromarray(np.dstack([rgb, np.zeros((32, 32), np.uint8)])).save(png)
    Image.fromarray(np.dstack([_label(1)] * 3)).save(lab)
    expected.add(("1", "s1t1", "900"))
    result, manifest, _, log = run(root, tmp_path / "run")

    assert keys(manifest) == expected
    row = manifest[manifest.exam_id == "900"].iloc[0]
    assert row.image_path == str(png) and row.label_path == str(lab)
    gray = np.asarray(Image.open(row.image_path).convert("L"), dtype=float)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray - luma).max() <= 1.0
    modes = {c["mode"] for c in result.conversions}
    assert modes == {"RGBA", "RGB"} and "converted" in log
    assert json.loads((tmp_path / "run" / "ingest.json").read_text())["conversions"] == result.conversions


def test_16bit_images_get_8bit_copies(tmp_path):
    root = tmp_path / "soul"
    expected = base_tree(root)
    img, lab = write_pair(root, "s1t1", "1", "900")
    img.unlink(), lab.unlink()
    wide = np.full((32, 32), 32768, np.uint16)
    wide[0, 0] = 65535
    Image.fromarray(wide).save(img.with_suffix(".png"))
    mask = np.zeros((32, 32), np.uint16)
    mask[5:9] = 1  # 16-bit 0/1 mask
    Image.fromarray(mask).save(lab.with_suffix(".png"))
    small_img, small_lab = write_pair(root, "s1t1", "1", "901")
    small_img.unlink()
    small = np.full((32, 32), 200, np.uint16)  # 8-bit data in 16 bits
    small[:, :16] = 100  # not constant: a constant image is quarantined
    Image.fromarray(small).save(small_img.with_suffix(".png"))
    expected |= {("1", "s1t1", "900"), ("1", "s1t1", "901")}
    result, manifest, _, _ = run(root, tmp_path / "run")

    assert keys(manifest) == expected
    rows = manifest.set_index("exam_id")
    conv = tmp_path / "run" / "converted"
    for col in ("image_path", "label_path"):
        assert Path(rows.loc["900", col]).is_relative_to(conv)
    out = np.asarray(Image.open(rows.loc["900", "image_path"]))
    assert out.dtype == np.uint8 and out[0, 0] == 255 and out[1, 1] == 128
    lab8 = np.asarray(Image.open(rows.loc["900", "label_path"]))
    assert set(np.unique(lab8)) == {0, 255} and lab8[6].min() == 255
    assert np.asarray(Image.open(rows.loc["901", "image_path"])).max() == 200
    assert rows.loc["901", "label_path"] == str(small_lab)
    assert {c["mode"] for c in result.conversions} == {"I;16"} and len(result.conversions) == 3


def test_hidden_and_system_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "soul"
    expected = base_tree(root)
    junk = [root / ".DS_Store", root / "S1" / "Thumbs.db", kind_dir(root, "s1t1", "image", "1") / "._1_101.jpg",
            kind_dir(root, "s1t1", "label", "1") / "desktop.ini", kind_dir(root, "s1t1", "image", "1") / ".DS_Store"]
    for path in junk:
        path.write_bytes(b"\x00junk")
    (root / "__MACOSX" / "S1").mkdir(parents=True)
    result, manifest, quarantine, log = run(root, tmp_path / "run")
    assert keys(manifest) == expected and quarantine.empty
    assert result.n_skipped_hidden == len(junk) + 1
    assert "skipped 6 hidden/system file(s)" in log


def test_same_exam_under_two_subsets_keeps_earliest_stage(tmp_path):
    root = tmp_path / "soul"
    expected = base_tree(root)
    kept_img, _ = write_pair(root, "s1t1", "1", "555", seed=7)
    dup_img, dup_lab = write_pair(root, "s1t2", "1", "555", seed=7)
    copy_img, copy_lab = write_pair(root, "s2t1", "1", "777", seed=8)
    clone_img, clone_lab = write_pair(root, "s2t2", "1", "778", seed=8)  # byte-identical image, other exam id
    expected |= {("1", "s1t1", "555"), ("1", "s2t1", "777")}
    result, manifest, quarantine, log = run(root, tmp_path / "run")

    assert keys(manifest) == expected
    got = reasons(quarantine)
    assert got[str(dup_img)].startswith(f"duplicate of {kept_img}")
    assert got[str(dup_lab)].startswith("duplicate of ") and "s1t1" in got[str(dup_lab)]
    assert got[str(clone_img)].startswith(f"duplicate of {copy_img}") and "identical" in got[str(clone_img)]
    assert set(got) == {str(dup_img), str(dup_lab), str(clone_img), str(clone_lab)}
    assert {(d["kept_stage"], d["dropped_stage"]) for d in result.duplicates} == {("s1t1", "s1t2"), ("s2t1", "s2t2")}
    assert "duplicate" in log


# ---------------------------------------------------------------------------- fatal input: one-line errors

def _make_missing(tmp_path):
    return tmp_path / "nope"


def _make_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    return tmp_path / "empty"


def _make_not_soul(tmp_path):
    for name in ("photos", "docs"):
        (tmp_path / "other" / name).mkdir(parents=True)
    return tmp_path / "other"


def _make_not_csv(tmp_path):
    path = tmp_path / "sheet.xlsx"
    pd.DataFrame({"a": [1]}).to_excel(path)
    return path


def _make_csv_missing_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("patient,stage,image\n1,0,a.jpg\n")
    return path


def _make_csv_without_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("patient_id,stage,image_path\n")
    return path


def _make_binary_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(bytes(range(256)) * 3)
    return path


@pytest.mark.parametrize("make, words", [
    (_make_missing, "does not exist"), (_make_empty, "is empty"), (_make_not_soul, "does not look like SOUL"),
    (_make_not_csv, "not a manifest CSV"), (_make_csv_missing_columns, "lacks column(s) patient_id, image_path"),
    (_make_csv_without_rows, "no rows"), (_make_binary_csv, "cannot read manifest"),
], ids=["missing", "empty", "not-soul", "not-csv", "csv-missing-columns", "csv-no-rows", "csv-binary"])
def test_unusable_source_raises_one_line_input_error(tmp_path, make, words):
    source = make(tmp_path)
    for call in (lambda: check_source(source), lambda: ingest(source, tmp_path / "run", log=lambda m: None)):
        with pytest.raises(InputDataError) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message
    assert not (tmp_path / "run" / "manifest.csv").exists()


def test_nothing_usable_raises_after_writing_quarantine(tmp_path):
    root = tmp_path / "soul"
    img, _ = write_pair(root, "s1t1", "1", "1")
    img.write_bytes(b"")
    with pytest.raises(InputDataError, match="no usable image/label pairs"):
        ingest(root, tmp_path / "run", log=lambda m: None)
    assert len(pd.read_csv(tmp_path / "run" / "quarantine.csv")) == 2


# ---------------------------------------------------------------------------- clinical sheet problems only warn

def _sheet_garbage(root):
    (root / "Infomation.xlsx").write_bytes(b"not a workbook")
    return "unreadable", "unreadable"


def _sheet_missing_tab(root):
    pd.DataFrame({"SubID": [1, 2, 10]}).to_excel(root / "Infomation.xlsx", sheet_name="basic_info", index=False)
    return "partial", "no 'image_info' sheet"


def _sheet_ok(root):
    with pd.ExcelWriter(root / "Infomation.xlsx") as xl:
        pd.DataFrame({"SubID": [1, 2]}).to_excel(xl, sheet_name="basic_info", index=False)
        pd.DataFrame({"SubID": [1], "ImageName": ["1_101.jpg"]}).to_excel(xl, sheet_name="image_info", index=False)
    return "ok", "1 patient(s) have images but no basic_info row: 10"


@pytest.mark.parametrize("make_sheet", [_sheet_garbage, _sheet_missing_tab, _sheet_ok],
                         ids=["garbage", "missing-tab", "ok"])
def test_clinical_sheet_status_is_recorded_and_ingest_carries_on(tmp_path, make_sheet):
    root = tmp_path / "soul"
    expected = base_tree(root)
    status, warning = make_sheet(root)
    result, manifest, _, log = run(root, tmp_path / "run")
    assert keys(manifest) == expected
    assert result.clinical["status"] == status
    assert any(warning in w for w in result.warnings) and warning in log
    assert json.loads((tmp_path / "run" / "ingest.json").read_text())["clinical"]["status"] == status


# ---------------------------------------------------------------------------- manifest CSV input

def test_manifest_csv_input(tmp_path):
    data = tmp_path / "clinic"
    files = {}
    for name, seed in [("a1", 1), ("a2", 2), ("b1", 3), ("b2", 4), ("c1", 5), ("gone", 0)]:
        (data / "img").mkdir(parents=True, exist_ok=True)
        (data / "lab").mkdir(exist_ok=True)
        Image.fromarray(_image(seed)).save(data / "img" / f"{name}.png")
        Image.fromarray(_label(seed)).save(data / "lab" / f"{name}.png")
        files[name] = data / "img" / f"{name}.png"
    (data / "img" / "gone.png").unlink()
    pd.DataFrame([
        ("P-A", "0", "img/a1.png", "lab/a1.png"),
        ("P-A", "S2T1", "img/a2.png", ""),  # stage by name, no label: kept, label_path ''
        ("P-B", "3", str(data / "img" / "b1.png"), "lab/b1.png"),  # absolute path
        ("P-B", "7", "img/b2.png", "lab/b2.png"),  # unknown stage
        ("P-B", "s3t2", "img/gone.png", "lab/gone.png"),  # missing file
        ("P-C", "1", "img/c1.png", "lab/c1.png"),
        ("P-C", "2", "img/c1.png", "lab/c1.png"),  # the same file again, later stage
    ], columns=["patient_id", "stage", "image_path", "label_path"]).to_csv(data / "list.csv", index=False)

    # as Excel writes it in many locales: UTF-8 BOM, semicolons
    text = (data / "list.csv").read_text().replace(",", ";")
    (data / "list.csv").write_bytes("\ufeff".encode() + text.encode())
    check_source(data / "list.csv")
    result, manifest, quarantine, _ = run(data / "list.csv", tmp_path / "run")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert list(zip(manifest.patient_id, manifest.stage, manifest.exam_id)) == [
        ("P-A", 0, "a1"), ("P-A", 2, "a2"), ("P-B", 3, "b1"), ("P-C", 1, "c1")]
    assert manifest.set_index("exam_id").loc["a2", "label_path"] == ""
    assert manifest.set_index("exam_id").loc["a1", "label_path"] == str(data / "lab" / "a1.png")
    assert (manifest.subset == manifest.stage_name).all() and result.source_kind == "manifest"
    got = reasons(quarantine)
    assert "unknown stage '7'" in got[str(files["b2"])] and "manifest line 5" in got[str(files["b2"])]
    assert "file not found" in got[str(data / "img" / "gone.png")]
    assert "its image is missing" in got[str(data / "lab" / "gone.png")]
    dup = reasons(quarantine[quarantine.reason.str.startswith("duplicate of")])
    assert dup[str(files["c1"])].startswith(f"duplicate of {files['c1']}") and "manifest line 8" in dup[str(files["c1"])]
    assert len(dup) == 2 and str(data / "lab" / "c1.png") in dup
    assert result.clinical == {"status": "not applicable"}


# ---------------------------------------------------------------------------- Prefect wrapper

def test_step_retries_io_errors_but_not_bad_input():
    from prefect.states import Failed

    from tasks.ingest import INGEST
    from tasks.engine import retry_io_errors

    assert INGEST.name == "ingest" and INGEST.retries == 1 and INGEST.reads_source
    assert retry_io_errors(None, None, Failed(data=OSError("disk hiccup")))
    assert not retry_io_errors(None, None, Failed(data=InputDataError("bad root")))
    assert not retry_io_errors(None, None, Failed(data=ValueError("bug")))


# ---------------------------------------------------------------------------- the phantom reads back as written

def test_phantom_counts_match(tmp_path):
    from flows.phantom import PhantomConfig, generate_phantom

    summary = generate_phantom(tmp_path / "ph", PhantomConfig(n_patients=6, seed=0, image_size=64))
    result, manifest, quarantine, _ = run(tmp_path / "ph", tmp_path / "run")
    assert quarantine.empty and result.n_images == summary.n_images and result.n_patients == 6
    assert {s: v["images"] for s, v in result.per_stage.items()} == summary.images_per_stage
    assert {s: v["patients"] for s, v in result.per_stage.items()} == summary.patients_per_stage
    assert result.clinical["status"] == "ok" and not result.warnings
