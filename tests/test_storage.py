"""storage: the 'brvo-paired' writer/reader, validate(), atomic writes, the torch Dataset."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from storage.errors import DatasetFormatError
from storage.paired_format import (
    FORMAT_NAME,
    SCORE_COLUMNS,
    PairedDatasetWriter,
    encode_pair,
    read_arrays,
    read_meta,
    validate,
)
from storage.torch_dataset import PairedImageDataset

SIZE = 16


def _rows(n: int, start: int = 0, synthetic: bool = False) -> dict:
    return {
        "patient_id": [f"{(start + i) // 3 + 1:03d}" for i in range(n)],
        "stage": [(start + i) % 6 for i in range(n)],
        "exam_id": ["" if synthetic else str(1000 + start + i) for i in range(n)],
        "subset": [["s1t1", "s1t2", "s2t1", "s2t2", "s3t1", "s3t2"][(start + i) % 6] for i in range(n)],
        "split": [("train", "train", "val", "test")[((start + i) // 3) % 4] for i in range(n)],
        "is_synthetic": [synthetic] * n,
        "label_source": ["pix2pix" if synthetic else "annotation"] * n,
    }


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    labels = (rng.random((n, SIZE, SIZE)) < 0.2).astype(np.uint8)
    return images, labels


def write_mixed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """12 real rows in two batches + 6 synthetic rows (2 of them rejected)."""
    i1, l1 = _arrays(5, 1)
    i2, l2 = _arrays(7, 2)
    i3, l3 = _arrays(6, 3)
    syn = _rows(6, start=12, synthetic=True)
    syn["accepted"] = [True, False, True, True, False, True]
    syn["realism"] = np.linspace(0, 1, 6).tolist()
    with PairedDatasetWriter(path, SIZE, attrs={"description": "unit test", "source_sha256": "abc"}) as w:
        w.append(i1, l1, _rows(5))
        w.append(i2, l2, pd.DataFrame(_rows(7, start=5)))
        w.append(i3, l3, syn)
    return np.concatenate([i1, i2, i3]), np.concatenate([l1, l2, l3])


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    path = tmp_path / "data.h5"
    images, labels = write_mixed(path)
    return path, images, labels


def test_round_trip(mixed):
    path, images, labels = mixed
    summary = validate(path)
    assert (summary.n, summary.n_real, summary.n_synthetic, summary.image_size) == (18, 12, 6, SIZE)
    assert summary.attrs["description"] == "unit test" and summary.attrs["source_sha256"] == "abc"
    assert summary.attrs["compression"] == "gzip-1" and summary.attrs["code_version"]
    got_images, got_labels = read_arrays(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    rows = [17, 0, 5, 5]
    sub_i, sub_l = read_arrays(path, rows)
    np.testing.assert_array_equal(sub_i, images[rows])
    np.testing.assert_array_equal(sub_l, labels[rows])
    meta = read_meta(path)
    assert meta["patient_id"].iloc[0] == "001" and meta["exam_id"].iloc[-1] == ""
    assert meta["accepted"].tolist() == [True] * 12 + [True, False, True, True, False, True]
    assert np.isnan(meta["realism"].iloc[:12]).all() and meta["realism"].iloc[-1] == pytest.approx(1.0)
    assert set(SCORE_COLUMNS) <= set(meta.columns)
    with h5py.File(path, "r") as f:
        assert f["images"].chunks == (1, SIZE, SIZE) and f["images"].compression == "gzip"


def test_output_passes_the_deep_format_check(mixed):
    """The project's own validator, reading every chunk; .ci/run also runs the independent checker
    (../shared/tools/check_format.py) on the files a tiny demo writes."""
    summary = validate(mixed[0], deep=True)
    assert summary.n_synthetic > 0 and summary.n_real > 0


def test_writer_rejects_bad_batches(tmp_path):
    images, labels = _arrays(2, 0)
    with PairedDatasetWriter(tmp_path / "x.h5", SIZE) as w:
        with pytest.raises(ValueError, match="0/1"):
            w.append(images, labels * 255, _rows(2))
        with pytest.raises(ValueError, match="uint8"):
            w.append(images.astype(np.float32), labels, _rows(2))
        with pytest.raises(ValueError, match="shapes"):
            w.append(images[:, :8], labels[:, :8], _rows(2))
        with pytest.raises(ValueError, match="lack columns"):
            w.append(images, labels, {k: v for k, v in _rows(2).items() if k != "split"})
        w.append(images, labels, _rows(2))
    assert validate(tmp_path / "x.h5").n == 2


# --------------------------------------------------------------------------------- validate


def _mutate(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


@pytest.mark.parametrize("mutation, message", [
    (lambda f: f.attrs.__setitem__("format", "something-else"), "format is 'something-else'"),
    (lambda f: f.attrs.__setitem__("format_version", 3), "format_version 3"),
    (lambda f: _replace(f, "images", np.zeros((18, SIZE, SIZE // 2), np.uint8)), "/images has shape"),
    (lambda f: _replace(f, "labels", np.zeros((17, SIZE, SIZE), np.uint8)), "/labels shape"),
    (lambda f: _replace(f, "images", np.zeros((18, SIZE, SIZE), np.float32)), "/images dtype is float32"),
    (lambda f: f["meta"].__delitem__("split"), "missing meta column 'split'"),
    (lambda f: _replace(f, "meta/stage", np.zeros(17, np.int16)), "meta column 'stage' has shape"),
    (lambda f: f.attrs.__setitem__("n_synthetic", 0), "n_real/n_synthetic disagree"),
])
def test_validate_names_what_is_wrong(mixed, mutation, message):
    path = mixed[0]
    _mutate(path, mutation)
    with pytest.raises(DatasetFormatError, match=message) as info:
        validate(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_validate_rejects_non_hdf5_and_missing_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5\n")
    with pytest.raises(DatasetFormatError, match="not a readable HDF5 file"):
        validate(text)
    with pytest.raises(DatasetFormatError, match="no such file"):
        validate(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:  # HDF5, but not ours
        f["x"] = np.arange(3)
    with pytest.raises(DatasetFormatError, match=f"expected '{FORMAT_NAME}'"):
        validate(tmp_path / "other.h5")


# ---------------------------------------------------------------------------------- atomic


def test_writer_exception_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "soul.h5"
    images, labels = _arrays(3, 0)
    with pytest.raises(RuntimeError, match="boom"):
        with PairedDatasetWriter(path, SIZE) as w:
            w.append(images, labels, _rows(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    write_mixed(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with PairedDatasetWriter(path, SIZE) as w:
            w.append(images, labels, _rows(3))
            raise RuntimeError("boom")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["soul.h5"]
    assert validate(path).n == 18


def test_file_appears_only_on_close(tmp_path):
    path = tmp_path / "soul.h5"
    w = PairedDatasetWriter(path, SIZE)
    w.append(*_arrays(2, 0), _rows(2))
    assert not path.exists()
    w.close()
    assert validate(path).n == 2


# ----------------------------------------------------------------------------- torch Dataset


def test_dataset_items_and_filters(mixed):
    path, images, labels = mixed
    ds = PairedImageDataset(path)
    assert len(ds) == 18
    image, label, meta = ds[3]
    assert image.dtype == torch.float32 and image.shape == (1, SIZE, SIZE)
    torch.testing.assert_close(image[0], torch.from_numpy(images[3]).float() / 255)
    torch.testing.assert_close(label[0], torch.from_numpy(labels[3]).float())
    assert meta["row"] == 3 and meta["patient_id"] == "002" and meta["is_synthetic"] is False

    meta_all = read_meta(path)
    train = PairedImageDataset(path, split="train")
    assert list(train.rows) == list(np.flatnonzero(meta_all["split"] == "train"))
    both = PairedImageDataset(path, split=("val", "test"))
    assert len(both) == int(meta_all["split"].isin(["val", "test"]).sum())
    assert len(PairedImageDataset(path, is_synthetic=False)) == 12
    synthetic = PairedImageDataset(path, is_synthetic=True)
    assert list(synthetic.rows) == list(range(12, 18))
    accepted = PairedImageDataset(path, is_synthetic=True, accepted_only=True)
    assert list(accepted.rows) == [12, 14, 15, 17]
    assert len(PairedImageDataset(path, accepted_only=True)) == 16  # real rows are always accepted


def test_dataset_transform_sees_image_and_label(mixed):
    flip = lambda im, lab: (torch.flip(im, [-1]), torch.flip(lab, [-1]))  # noqa: E731
    image, label, _ = PairedImageDataset(mixed[0], transform=flip)[0]
    torch.testing.assert_close(image[0], torch.from_numpy(mixed[1][0][:, ::-1].copy()).float() / 255)
    torch.testing.assert_close(label[0], torch.from_numpy(mixed[2][0][:, ::-1].copy()).float())


def test_dataset_with_two_dataloader_workers_opens_lazily_per_worker(mixed):
    path, images, _ = mixed
    ds = PairedImageDataset(path, split="train")
    assert ds._file is None  # the constructor reads meta and closes the file
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=2)
    seen_rows, seen_images = [], []
    for image, label, meta in loader:
        seen_rows += meta["row"].tolist()
        seen_images.append(image)
    assert ds._file is None  # only the workers opened it
    assert seen_rows == list(ds.rows)
    got = torch.cat(seen_images)[:, 0]
    torch.testing.assert_close(got, torch.from_numpy(images[ds.rows]).float() / 255)
    ds[0]  # the parent can still read: it opens its own handle
    assert ds._file is not None
    ds.close()


def test_failure_while_closing_leaves_nothing(tmp_path):
    path = tmp_path / "soul.h5"
    w = PairedDatasetWriter(path, SIZE, extra_columns=["notes"])
    rows = _rows(2)
    rows["notes"] = [{"a": 1}, {"b": 2}]  # objects HDF5 cannot store: fails when meta is written
    w.append(*_arrays(2, 0), rows)
    with pytest.raises(TypeError):
        w.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compression", ["gzip-1", "none"])
def test_append_encoded_round_trips(tmp_path, compression):
    """Chunks compressed elsewhere (preprocess workers) read back like append()'s."""
    images, labels = _arrays(4, 5)
    path = tmp_path / "enc.h5"
    with PairedDatasetWriter(path, SIZE, compression=compression) as w:
        w.append(images[:1], labels[:1], _rows(1))
        encoded = [encode_pair(im, lab, compression) for im, lab in zip(images[1:], labels[1:])]
        w.append_encoded([e[0] for e in encoded], [e[1] for e in encoded], _rows(3, start=1))
    got_images, got_labels = read_arrays(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert read_meta(path)["exam_id"].tolist() == ["1000", "1001", "1002", "1003"]


def test_encode_pair_checks_like_append(tmp_path):
    images, labels = _arrays(1, 0)
    with pytest.raises(ValueError, match="0/1"):
        encode_pair(images[0], labels[0] * 255, "gzip-1")
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode_pair(images[0], labels[0], "lzf")
    with PairedDatasetWriter(tmp_path / "x.h5", SIZE, compression="lzf") as w:
        with pytest.raises(ValueError, match="use append"):
            w.append_encoded([b""], [b""], _rows(1))
        w.append(images, labels, _rows(1))


def test_rejected_batch_leaves_meta_columns_aligned(tmp_path):
    path = tmp_path / "x.h5"
    images, labels = _arrays(2, 0)
    with PairedDatasetWriter(path, SIZE, extra_columns=["note"]) as w:
        with pytest.raises(ValueError, match="extra column 'note'"):
            w.append(images, labels, _rows(2))  # lacks 'note': nothing of it may be kept
        rows = _rows(2)
        rows["note"] = ["a", "b"]
        w.append(images, labels, rows)
    assert validate(path).n == 2 and read_meta(path)["note"].tolist() == ["a", "b"]
