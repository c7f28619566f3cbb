"""What ingest and the source fingerprint see of an input: the same manifest rows, every degenerate
pair in quarantine with its reason, and no tree (symlink loops included) that ends in a traceback.

Every case keeps a valid neighbour beside the bad one and checks it still reaches manifest.csv.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage.fingerprint import fingerprint_source, source_files
from tasks.ingest import ingest


def _quiet(_msg: str) -> None:
    pass


def _image(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random mid-grey image of (width, height)."""
    return (np.random.default_rng(seed).random(size[::-1]) * 200 + 20).astype(np.uint8)


def _label(size: tuple[int, int] = (32, 32), every: int = 8) -> np.ndarray:
    """Vessels as one-pixel columns every ``every`` px: density 1/every, like SOUL's 0.05-0.4."""
    lab = np.zeros(size[::-1], np.uint8)
    lab[:, ::every] = 255
    return lab


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _run(source: Path, run_dir: Path, **kw):
    result = ingest(source, run_dir, log=_quiet, **kw)
    manifest = pd.read_csv(run_dir / "manifest.csv", dtype={"patient_id": str, "exam_id": str}, keep_default_na=False)
    quarantine = pd.read_csv(run_dir / "quarantine.csv", keep_default_na=False)
    return result, manifest, dict(zip(quarantine.path, quarantine.reason))


# ---------------------------------------------------------------------------- one manifest reader

MANIFEST_STYLES = {
    "semicolon": (";", "patient_id;stage;image_path;label_path", ""),
    "tab": ("\t", "patient_id\tstage\timage_path\tlabel_path", ""),
    "upper-case header": (",", "PATIENT_ID,Stage,Image_Path,LABEL_PATH", ""),
    "excel: BOM, semicolons, upper case": (";", "Patient_ID;STAGE;IMAGE_PATH;Label_Path", "\ufeff"),
}


def _clinic(folder: Path, style: str) -> tuple[Path, list[Path]]:
    """Three patients' pairs (a split needs three) and a manifest in ``style``; returns (manifest, images)."""
    sep, header, bom = MANIFEST_STYLES[style]
    lines, images = [header], []
    for i, (pid, stage) in enumerate((("7", "s1t1"), ("8", "2"), ("9", "s3t2"))):
        image = _save(folder / "img" / f"{pid}_{100 + i}.png", _image(i))
        _save(folder / "lab" / f"{pid}_{100 + i}.png", _label())
        lines.append(sep.join((pid, stage, f"img/{image.name}", f"lab/{image.name}")))
        images.append(image)
    manifest = folder / "list.csv"
    manifest.write_text(bom + "\n".join(lines) + "\n", encoding="utf-8")
    return manifest, images


@pytest.mark.parametrize("style", list(MANIFEST_STYLES))
def test_fingerprint_sees_an_image_changed_in_place_whatever_the_manifest_style(tmp_path, style):
    manifest, images = _clinic(tmp_path / "clinic", style)
    before = fingerprint_source(manifest)
    # the fingerprint covers exactly the files ingest reads
    _, rows, quarantine = _run(manifest, tmp_path / "run")
    assert not quarantine and len(rows) == 3
    listed = {path.resolve() for _, path in source_files(manifest) if path is not None}
    read = {Path(p).resolve() for col in ("image_path", "label_path") for p in rows[col]}
    assert listed == read | {manifest.resolve()}

    inverted = 255 - np.asarray(Image.open(images[1]))
    Image.fromarray(inverted).save(images[1])  # in place: same name, new content
    assert fingerprint_source(manifest).digest != before.digest


def test_prepare_rebuilds_soul_h5_when_an_image_of_a_semicolon_manifest_changes(tmp_path):
    from flows.prepare import PREPARE, run_steps
    from storage.run_dir import RunPaths
    from tasks.config import preset
    from tasks.engine import execute_plainly

    manifest, images = _clinic(tmp_path / "clinic", "semicolon")
    run_dir = tmp_path / "run"
    run_steps(PREPARE, run_dir, preset("tiny"), source=manifest, execute=execute_plainly)
    soul_h5 = RunPaths.of(run_dir).soul_h5
    first = hashlib.sha256(soul_h5.read_bytes()).hexdigest()

    Image.fromarray(255 - np.asarray(Image.open(images[0]))).save(images[0])
    again = run_steps(PREPARE, run_dir, preset("tiny"), source=manifest, execute=execute_plainly)
    assert again.cached == []  # neither step is served from its old record
    assert hashlib.sha256(soul_h5.read_bytes()).hexdigest() != first


# ---------------------------------------------------------------------------- degenerate pairs

DEGENERATE = {  # name -> (image, label, words the reason must hold)
    "1x1 px": (_image(1, (1, 1)), np.full((1, 1), 255, np.uint8), "smaller than"),
    "10000x10 px, squashed to a square": (_image(2, (10000, 10)), _label((10000, 10)), "aspect ratio 1000"),
    "400x20 px": (_image(2, (400, 20)), _label((400, 20)), "aspect ratio 20"),
    "constant image": (np.full((32, 32), 128, np.uint8), _label(), "constant"),
    "all-255 label": (_image(3), np.full((32, 32), 255, np.uint8), "vessel density 1.000"),
    "near-empty label": (_image(4, (64, 64)), np.pad(np.full((1, 2), 255, np.uint8), ((0, 63), (0, 62))),
                         "vessel density 0.000"),
    "all-0 label": (_image(5), np.zeros((32, 32), np.uint8), "no pixel above 127"),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_a_degenerate_pair_is_quarantined_with_its_reason_and_its_neighbour_kept(tmp_path, case):
    image, label, words = DEGENERATE[case]
    data = tmp_path / "clinic"
    _save(data / "good.png", _image(0))
    _save(data / "good_l.png", _label())
    bad, bad_label = _save(data / "bad.png", image), _save(data / "bad_l.png", label)
    pd.DataFrame([("P1", "0", "good.png", "good_l.png"), ("P1", "1", "bad.png", "bad_l.png")],
                 columns=["patient_id", "stage", "image_path", "label_path"]).to_csv(data / "m.csv", index=False)

    result, manifest, quarantine = _run(data / "m.csv", tmp_path / "run")
    assert list(manifest.image_path) == [str(data / "good.png")]
    assert words in quarantine[str(bad)] and words in quarantine[str(bad_label)], quarantine
    assert result.n_quarantined == 2


def test_the_sanity_bounds_are_the_config_s_and_reach_the_ingest_step(tmp_path):
    from storage.errors import BrvoError, InputDataError
    from tasks.config import preset
    from tasks.ingest import ingest_step
    from tasks.engine import StepContext

    data = tmp_path / "clinic"
    _save(data / "a.png", _image(0, (12, 12)))
    _save(data / "a_l.png", _label((12, 12), every=4))
    pd.DataFrame([("P1", "0", "a.png", "a_l.png")],
                 columns=["patient_id", "stage", "image_path", "label_path"]).to_csv(data / "m.csv", index=False)
    with pytest.raises(InputDataError, match="no usable"):  # 12 px is below the default minimum side
        ingest(data / "m.csv", tmp_path / "default", log=_quiet)
    config = preset("tiny").with_overrides(**{"input_sanity.min_image_side": 8})
    result = ingest_step(StepContext(run_dir=tmp_path / "run", config=config, source=data / "m.csv", log=_quiet))
    assert result.n_images == 1 and result.n_quarantined == 0
    with pytest.raises(BrvoError, match="max_label_density"):
        preset("tiny").with_overrides(**{"input_sanity.max_label_density": 0.2})


def test_soul_sized_phantom_passes_every_bound(tmp_path):
    """SOUL's images are 304 px with vessel density about 0.05-0.4; the phantom at that size, with its
    densest and widest vessels, must not lose a single pair to the bounds."""
    from flows.phantom import PhantomConfig, generate_phantom

    summary = generate_phantom(tmp_path / "ph", PhantomConfig(n_patients=2, seed=0, image_size=304,
                                                              vessel_density=3.0, vessel_width=2.5))
    result, _, quarantine = _run(tmp_path / "ph", tmp_path / "run")
    assert not quarantine and result.n_images == summary.n_images


# ---------------------------------------------------------------------------- SOUL tree shape

def _pair(root: Path, stage_dir: str, pid: str, exam: str, seed: int) -> tuple[Path, Path]:
    image = _save(root / stage_dir / "image" / pid / f"{pid}_{exam}.png", _image(seed))
    label = _save(root / stage_dir / "label" / pid / f"{pid}_{exam}.png", _label())
    return image, label


def _soul(root: Path) -> set[str]:
    """A small SOUL tree; returns the exam ids it holds."""
    for i, stage_dir in enumerate(("S1/s1t1", "S1/s1t2", "S2/s2t1", "S3/s3t2")):
        _pair(root, stage_dir, "1", f"10{i}", i)
        _pair(root, stage_dir, "2", f"20{i}", 10 + i)
    return {f"{p}0{i}" for p in ("1", "2") for i in range(4)}


def test_a_pair_under_an_unknown_stage_folder_is_quarantined_naming_the_folder(tmp_path):
    root = tmp_path / "soul"
    exams = _soul(root)
    image, label = _pair(root, "S1/s1t3", "1", "900", 99)
    stray = _save(root / "S2" / "s2t1" / "images_old" / "1" / "1_901.png", _image(98))

    _, manifest, quarantine = _run(root, tmp_path / "run")
    assert set(manifest.exam_id) == exams
    for path in (image, label):
        assert "unknown stage folder s1t3; expected s1t1..s3t2" in quarantine[str(path)]
    assert "images_old" in quarantine[str(stray)]


@pytest.mark.parametrize("target", [".", "self", ".."])
def test_a_symlink_loop_is_quarantined_and_the_rest_ingests(tmp_path, target):
    from flows.run_steps import run_steps
    from tasks.config import preset
    from tasks.ingest import INGEST
    from tasks.engine import execute_plainly

    root = tmp_path / "soul"
    exams = _soul(root)
    before = fingerprint_source(root)
    loops = [root / "S1" / "self", root / "S2" / "s2t1" / "image" / "1" / "self"]
    for link in loops:
        link.symlink_to(target)

    _, manifest, quarantine = _run(root, tmp_path / "run")
    assert set(manifest.exam_id) == exams
    for link in loops:
        assert "symlink loop" in quarantine[str(link)], quarantine
    assert fingerprint_source(root).digest != before.digest  # the loop is recorded (never followed) ...
    # through the step driver, which fingerprints the source first (run, prepare and retrain do)
    run = run_steps((INGEST,), tmp_path / "run2", preset("tiny"), source=root, execute=execute_plainly)
    assert run.result("ingest").n_images == len(exams)


def test_a_symlink_added_to_an_ingested_tree_reruns_ingest_and_is_quarantined(tmp_path):
    """A cached ingest must not hide a new quarantine row: the link's presence is part of the source."""
    from flows.run_steps import run_steps
    from tasks.config import preset
    from tasks.ingest import INGEST
    from tasks.engine import execute_plainly

    root = tmp_path / "soul"
    _soul(root)
    run_dir = tmp_path / "run"
    run_steps((INGEST,), run_dir, preset("tiny"), source=root, execute=execute_plainly)
    link = root / "S1" / "self"
    link.symlink_to(".")
    again = run_steps((INGEST,), run_dir, preset("tiny"), source=root, execute=execute_plainly)
    assert "ingest" not in again.cached
    quarantine = pd.read_csv(run_dir / "quarantine.csv", keep_default_na=False)
    assert "symlink loop" in dict(zip(quarantine.path, quarantine.reason))[str(link)]
