"""Preprocess: manifest.csv -> soul.h5 (split by patient, resizing rules, streaming, atomicity)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage.errors import BrvoError, InputDataError
from storage.paired_format import STAGE_NAMES, read_arrays, read_meta, validate
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig, preset
from tasks.engine import StepContext
from tasks.preprocess import (
    inspect_dataset,
    load_pair,
    preflight_preprocess,
    preprocess,
    PREPROCESS,
    preprocess_step,
    resize_label,
    split_patients,
)

MANIFEST_COLUMNS = ["patient_id", "stage", "stage_name", "exam_id", "subset", "image_path", "label_path",
                    "width", "height"]
CONFIG = preset("tiny")  # 32 px


def _quiet(_msg: str) -> None:
    pass


def _octa_like(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    label = np.zeros((size, size), np.uint8)
    for _ in range(6):
        a, b = rng.uniform(-1, 1, 2)
        c = rng.uniform(0, size)
        label |= (np.abs(a * xx + b * yy - c * (abs(a) + abs(b))) < 1.5).astype(np.uint8)
    image = np.clip(40 + 170 * label + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
    return image, label * 255


def write_run(run_dir: Path, plan: dict[str, dict[int, int]], *, size: int = 96, seed: int = 0,
              unlabelled: int = 0) -> Path:
    """Write JPG pairs and a manifest.csv like ingest's; ``plan`` = {patient: {stage: n_exams}}."""
    rng = np.random.default_rng(seed)
    img_dir = run_dir / "src"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    exam = 10001
    for pid, stages in plan.items():
        for stage, n in stages.items():
            for _ in range(n):
                image, label = _octa_like(rng, size)
                ip, lp = img_dir / f"{pid}_{exam}.jpg", img_dir / f"{pid}_{exam}_label.jpg"
                Image.fromarray(image).save(ip, quality=92)
                Image.fromarray(label).save(lp, quality=92)
                rows.append([pid, stage, STAGE_NAMES[stage], str(exam), STAGE_NAMES[stage], str(ip), str(lp),
                             size, size])
                exam += 1
    for k in range(unlabelled):
        image, _ = _octa_like(rng, size)
        ip = img_dir / f"nolabel_{k}.jpg"
        Image.fromarray(image).save(ip)
        rows.append(["001", 0, "s1t1", str(90000 + k), "s1t1", str(ip), "", size, size])
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(run_dir / "manifest.csv", index=False)
    return run_dir


PLAN = {  # 7 patients with leading zeros (ids must stay strings), uneven stage coverage
    "001": {0: 2, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1},
    "002": {0: 1, 1: 2},
    "003": {0: 1, 2: 1, 4: 1},
    "004": {0: 2},
    "005": {0: 1, 1: 1, 3: 1, 5: 1},
    "010": {1: 1, 2: 2},
    "011": {0: 1, 3: 1},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"), PLAN, unlabelled=2)


@pytest.fixture(scope="module")
def soul(run_dir):
    result = preprocess(run_dir, CONFIG, log=_quiet, chunk_size=4, workers=2)
    return result


def _file_meta_and_arrays(path: Path):
    meta = read_meta(path)
    images, labels = read_arrays(path)
    return meta, images, labels


# ------------------------------------------------------------------------------------- split


def _stage_sets(n: int, seed: int = 1) -> dict[str, set[int]]:
    """A SOUL-like cohort: stage 0 for most, later stages thinning out."""
    rng = np.random.default_rng(seed)
    keep = np.array([0.9, 0.7, 0.7, 0.5, 0.4, 0.2])
    out = {}
    for p in range(n):
        stages = {s for s in range(6) if rng.random() < keep[s]} or {0}
        out[str(p + 1)] = stages
    return out


def test_split_assigns_every_patient_once_with_requested_sizes():
    sets = _stage_sets(53)
    split = split_patients(sets, 0.15, 0.15, seed=0)
    assert set(split) == set(sets)
    counts = pd.Series(split).value_counts()
    assert counts["test"] == 8 and counts["val"] == 8 and counts["train"] == 37


def test_split_test_and_val_patients_have_two_stages_and_cover_all_stages():
    sets = _stage_sets(53)
    split = split_patients(sets, 0.15, 0.15, seed=3)
    for name in ("test", "val"):
        members = [p for p, s in split.items() if s == name]
        assert all(len(sets[p]) >= 2 for p in members), name
        assert set().union(*(sets[p] for p in members)) == set(range(6)), name
    train = [p for p, s in split.items() if s == "train"]
    assert set().union(*(sets[p] for p in train)) == set(range(6))


def test_split_never_takes_a_stage_away_from_training():
    # stage 5 seen in a single patient, who also has the most stages (the first pick otherwise):
    # they must stay in train so the models see stage 5 at all
    sets = {"1": {0, 1, 2, 5}, "2": {0, 1}, "3": {0, 1}, "4": {0, 2}, "5": {1, 2}, "6": {0, 2}}
    split = split_patients(sets, 0.2, 0.2, seed=0)
    assert split["1"] == "train"
    assert set(split.values()) == {"train", "val", "test"}


def test_split_is_deterministic_and_seeded():
    sets = _stage_sets(40)
    reordered = dict(reversed(list(sets.items())))
    a = split_patients(sets, 0.2, 0.2, seed=7)
    assert a == split_patients(reordered, 0.2, 0.2, seed=7)
    others = [split_patients(sets, 0.2, 0.2, seed=s) for s in range(8, 12)]
    assert any(o != a for o in others)


def test_split_three_patients_is_one_each_and_fewer_is_an_error():
    split = split_patients({"a": {0, 1}, "b": {0, 2}, "c": {1}}, 0.15, 0.15, seed=0)
    assert sorted(split.values()) == ["test", "train", "val"]
    assert split["c"] == "train"  # the only single-stage patient cannot serve held-out evaluation
    with pytest.raises(BrvoError, match="at least 3"):
        split_patients({"a": {0, 1}, "b": {0}}, 0.15, 0.15, seed=0)


def test_preprocess_too_few_patients_is_a_one_line_error(tmp_path):
    write_run(tmp_path, {"001": {0: 1, 1: 1}, "002": {0: 1}})
    with pytest.raises(BrvoError, match="at least 3") as info:
        preprocess(tmp_path, CONFIG, log=_quiet)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "soul.h5").exists()


def test_missing_manifest_says_run_ingest_first(tmp_path):
    with pytest.raises(InputDataError, match="run ingest first"):
        preflight_preprocess(tmp_path)
    with pytest.raises(InputDataError, match="run ingest first"):
        preprocess(tmp_path, CONFIG, log=_quiet)


def test_manifest_with_bad_stage_or_missing_column_is_rejected(tmp_path):
    write_run(tmp_path, {"001": {0: 1}, "002": {0: 1}, "003": {0: 1}}, size=40)
    df = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[1, "stage"] = "7"
    df.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(InputDataError, match="not 0..5"):
        preprocess(tmp_path, CONFIG, log=_quiet)
    df.drop(columns=["label_path"]).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(InputDataError, match="label_path"):
        preprocess(tmp_path, CONFIG, log=_quiet)


# ------------------------------------------------------------------------------- the output


def test_soul_h5_contents_split_and_attrs(run_dir, soul):
    path = Path(soul.path)
    summary = validate(path)
    assert summary.image_size == 32 and summary.n_synthetic == 0
    meta = read_meta(path)
    n_pairs = sum(sum(s.values()) for s in PLAN.values())
    assert soul.n_rows == summary.n == len(meta) == n_pairs  # unlabelled rows skipped ...
    assert soul.n_skipped_unlabelled == 2  # ... and counted
    assert sorted(meta["patient_id"].unique()) == sorted(PLAN)  # '001' stays '001'
    assert (meta.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(meta["split"]) == {"train", "val", "test"}
    test_patients = meta.loc[meta["split"] == "test", "patient_id"].unique()
    assert all(len(PLAN[p]) >= 2 for p in test_patients)
    assert set(meta["label_source"]) == {"annotation"} and not meta["is_synthetic"].any()
    for pid, stages in PLAN.items():
        got = meta.loc[meta["patient_id"] == pid, "stage"].value_counts().to_dict()
        assert got == stages
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        assert f["images"].compression == "gzip"
    assert PipelineConfig.model_validate_json(attrs["config_json"]) == CONFIG
    assert attrs["source_sha256"] == hashlib.sha256((run_dir / "manifest.csv").read_bytes()).hexdigest()
    assert int(attrs["split_seed"]) == CONFIG.seed and attrs["description"]
    assert soul.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _, labels = read_arrays(path)
    assert set(np.unique(labels)) <= {0, 1} and labels.any()


def test_output_passes_the_deep_format_check(soul):
    """The project's own validator, every chunk read (.ci/run adds the independent checker)."""
    assert validate(soul.path, deep=True).n_real == soul.n_rows


def test_chunking_and_workers_do_not_change_the_output(run_dir, soul, tmp_path):
    reference = _file_meta_and_arrays(Path(soul.path))
    # lzf has no Python encoder: the parent compresses (the other path through the writer)
    variants = [dict(chunk_size=1000, workers=1), dict(chunk_size=3, workers=1), dict(chunk_size=1, workers=2),
                dict(chunk_size=3, workers=2, compression="lzf")]
    for k, kw in enumerate(variants):
        out = tmp_path / f"run-{k}"
        out.mkdir()
        (out / "manifest.csv").write_bytes((run_dir / "manifest.csv").read_bytes())
        config = CONFIG.with_overrides(compression=kw.pop("compression", CONFIG.compression))
        preprocess(out, config, log=_quiet, **kw)
        meta, images, labels = _file_meta_and_arrays(out / "soul.h5")
        pd.testing.assert_frame_equal(meta, reference[0])
        np.testing.assert_array_equal(images, reference[1])
        np.testing.assert_array_equal(labels, reference[2])


def test_inspect_summarises_splits_and_stages(soul):
    text = inspect_dataset(soul.path)
    assert "brvo-paired v2" in text and "32x32 px" in text and "gzip-1" in text
    for word in ("train", "val", "test", "s1t1", "s3t2", "code_version"):
        assert word in text
    n_stage0 = sum(s.get(0, 0) for s in PLAN.values())
    stage_line = next(line for line in text.splitlines() if " s1t1 " in f" {line} ")
    assert str(n_stage0) in stage_line.split()


def test_inspect_rejects_a_non_dataset(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    with pytest.raises(BrvoError, match="not a readable HDF5"):
        inspect_dataset(bad)


# ------------------------------------------------------------------------ resizing rules


def test_labels_are_binarised_at_127_before_nearest_resize(tmp_path):
    # 4x4 blocks alternating 127 / 128 (exact PNG), downscaled 2x: 127 -> 0, 128 -> 1, no other value
    blocks = (np.indices((16, 16)).sum(axis=0) % 2).astype(np.uint8)
    label = np.kron(blocks, np.ones((4, 4), np.uint8)) + 127
    Image.fromarray(label).save(tmp_path / "label.png")
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(tmp_path / "image.png")
    _, out = load_pair(str(tmp_path / "image.png"), str(tmp_path / "label.png"), 32)
    np.testing.assert_array_equal(out, np.kron(blocks, np.ones((2, 2), np.uint8)))

    # 1-px vessels in every 4th column: area-averaging then thresholding would erase them all
    # (mean 64 < 127); binarise-then-nearest samples pixel centres (column 2x+1) and keeps them
    thin = np.zeros((64, 64), np.uint8)
    thin[:, 1::4] = 255
    Image.fromarray(thin).save(tmp_path / "thin.png")
    _, out = load_pair(str(tmp_path / "image.png"), str(tmp_path / "thin.png"), 32)
    assert out.dtype == np.uint8
    assert (out[:, ::2] == 1).all() and (out[:, 1::2] == 0).all()


def test_label_resize_rules_keep_or_drop_thin_vessels_as_documented():
    # 64 -> 16 px (4x): a 1-px vessel in column 5 and a 3-px one in columns 40-42 (both inside one output column)
    mask = np.zeros((64, 64), bool)
    mask[:, 5] = True
    mask[:, 40:43] = True
    nearest = resize_label(mask, 16, "nearest")
    most = resize_label(mask, 16, "max")
    area = resize_label(mask, 16, "area")
    for out in (nearest, most, area):
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    # max: both vessels stay, each a connected 1-px line, nothing else is marked
    np.testing.assert_array_equal(np.flatnonzero(most.any(0)), [1, 10])
    assert most[:, [1, 10]].all()
    # area: the 1-px vessel covers a quarter of its column and vanishes, the 3-px one (3/4) stays
    np.testing.assert_array_equal(np.flatnonzero(area.any(0)), [10])
    assert area[:, 10].all()
    # nearest samples one pixel per output pixel: it can miss the thin vessel entirely
    assert nearest.sum() <= most.sum()
    with pytest.raises(ValueError, match="label_resize"):
        resize_label(mask, 16, "bicubic")


def test_label_resize_reaches_soul_h5_and_keys_the_step(run_dir, soul, tmp_path):
    (tmp_path / "manifest.csv").write_bytes((run_dir / "manifest.csv").read_bytes())
    preprocess(tmp_path, CONFIG.with_overrides(label_resize="max"), log=_quiet, workers=1)
    _, images, labels = _file_meta_and_arrays(tmp_path / "soul.h5")
    _, ref_images, ref_labels = _file_meta_and_arrays(Path(soul.path))
    np.testing.assert_array_equal(images, ref_images)  # images are resized the same way
    assert labels.sum() > ref_labels.sum()  # every annotated vessel pixel marks its output pixel
    assert not (ref_labels & ~labels).any()  # max marks at least what nearest's sampled pixel marks
    assert "label_resize" in PREPROCESS.config_fields  # a cached soul.h5 of another rule is never served
    with pytest.raises(BrvoError, match="label_resize"):
        CONFIG.with_overrides(label_resize="bilinear")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])  # .jpg takes the draft (DCT-downscale) path
def test_images_are_resized_with_antialiasing(tmp_path, suffix):
    stripes = np.zeros((128, 128), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: plain subsampling gives all-0 or all-255 columns
    Image.fromarray(stripes).save(tmp_path / f"image{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "label.png")
    image, _ = load_pair(str(tmp_path / f"image{suffix}"), str(tmp_path / "label.png"), 32)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert abs(float(image.mean()) - 127.5) < 6
    assert float(image.std()) < 8


def test_rgb_images_become_grayscale(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "label.png")
    image, _ = load_pair(str(tmp_path / "rgb.png"), str(tmp_path / "label.png"), 32)
    assert image.shape == (32, 32) and 100 < image.mean() < 150  # ITU-R 601 luma of pure green 200


# ------------------------------------------------------------------------------ atomicity


def _corrupt_last_pair(run_dir: Path) -> None:
    df = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
    bad = run_dir / "src" / "truncated.jpg"
    bad.write_bytes(Path(df.loc[len(df) - 1, "image_path"]).read_bytes()[:300])
    df.loc[len(df) - 1, "image_path"] = str(bad)
    df.to_csv(run_dir / "manifest.csv", index=False)


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name)


def test_failure_midway_leaves_no_file_and_keeps_an_old_one(tmp_path):
    write_run(tmp_path, {"1": {0: 2, 1: 2}, "2": {0: 2, 2: 1}, "3": {0: 1, 3: 2}, "4": {1: 2}}, size=48)
    _corrupt_last_pair(tmp_path)
    with pytest.raises(InputDataError, match="truncated.jpg"):
        preprocess(tmp_path, CONFIG, log=_quiet, chunk_size=2, workers=2)
    assert not (tmp_path / "soul.h5").exists() and _leftovers(tmp_path) == []

    old = b"an older soul.h5 that must survive"
    (tmp_path / "soul.h5").write_bytes(old)
    with pytest.raises(InputDataError):
        preprocess(tmp_path, CONFIG, log=_quiet, chunk_size=2, workers=1)
    assert (tmp_path / "soul.h5").read_bytes() == old and _leftovers(tmp_path) == []


def test_killed_run_never_leaves_a_half_file(tmp_path):
    """SIGKILL after a few chunks: no soul.h5 at the final path; the next run cleans the temp file."""
    write_run(tmp_path, {"1": {0: 2, 1: 2}, "2": {0: 2, 2: 2}, "3": {0: 2, 3: 2}}, size=48)
    script = textwrap.dedent(f"""
        import os, signal
        from tasks.config import PipelineConfig, preset
        from tasks.preprocess import preprocess
        def kill(done, total, **_):
            if done >= 4:
                os.kill(os.getpid(), signal.SIGKILL)
        preprocess({str(tmp_path)!r}, preset("tiny"), log=lambda m: None, chunk_size=2, workers=1, on_progress=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9
    assert not (tmp_path / "soul.h5").exists()
    assert len(_leftovers(tmp_path)) == 1  # the partial file sits beside the target, never at it
    messages = []
    preprocess(tmp_path, CONFIG, log=messages.append, workers=1)
    assert _leftovers(tmp_path) == [] and any("interrupted" in m for m in messages)
    validate(tmp_path / "soul.h5")


def test_step_wraps_the_plain_function(tmp_path):
    write_run(tmp_path, {"1": {0: 1, 1: 1}, "2": {0: 1, 2: 1}, "3": {0: 1}}, size=40)
    ingest = SimpleNamespace(paths={"manifest": str(RunPaths.of(tmp_path).manifest)})  # the ingest result it reads
    result = preprocess_step(StepContext(run_dir=tmp_path, config=CONFIG, log=lambda _m: None), ingest=ingest)
    assert result.n_rows == 5 and Path(result.path).exists()
    assert PREPROCESS.name == "preprocess" and PREPROCESS.retries == 1 and PREPROCESS.writes == ("soul_h5",)


def test_inspect_counts_synthetic_and_accepted_rows(tmp_path):
    from storage.paired_format import PairedDatasetWriter

    rows = {"patient_id": ["1", "1", "1", "2"], "stage": [0, 3, 3, 3], "exam_id": ["7", "", "", ""],
            "subset": ["s1t1", "s2t2", "s2t2", "s2t2"], "split": ["train"] * 4,
            "is_synthetic": [False, True, True, True], "label_source": ["annotation"] + ["pix2pix"] * 3,
            "accepted": [True, True, False, True]}
    with PairedDatasetWriter(tmp_path / "aug.h5", 32) as w:
        w.append(np.zeros((4, 32, 32), np.uint8), np.zeros((4, 32, 32), np.uint8), rows)
    text = inspect_dataset(tmp_path / "aug.h5")
    assert "4 rows (1 real, 3 synthetic)" in text
    stage3 = next(line for line in text.splitlines() if " s2t2 " in f" {line} ").split()
    assert stage3 == ["3", "s2t2", "0", "0", "3", "2"]  # stage, name, patients, real, synthetic, accepted
