"""The one writer and reader of the 'brvo-paired' HDF5 format, the project's dataset format (docs/design.md).

Layout::

    /images          uint8 (N, H, W), chunks (1, H, W), compressed, Fletcher32
    /labels          uint8 (N, H, W), 0/1 (vessel = 1), same chunks/filters
    /meta/<column>   1-D, length N, one dataset per column, chunked, Fletcher32
    root attrs       format, format_version, created_utc, image_size, n_real,
                     n_synthetic, config_json, code_version, source_sha256,
                     file_id (new for every write), ...

The preprocessed file (soul.h5) and the augmented file (augmented.h5) share it.

**Text columns** are fixed-length UTF-8 strings (HDF5 character set UTF-8, numpy
kind ``'S'``), so clinic ids such as ``Zoë-患者-🙂`` keep their full text. Why
fixed-length and not variable-length: both pass the independent checker, but h5py
reads variable-length strings as kind ``'O'`` and the README's snippet
(``.asstr()`` where ``dtype.kind == "S"``) would then hand users bytes; fixed-length
UTF-8 keeps kind ``'S'`` and ``.asstr()`` decodes it as UTF-8 by itself.

**Checksums.** Every dataset carries HDF5's Fletcher32 filter, so h5py itself raises
on a chunk whose bytes changed after it was written (a flipped bit in an image or in
the ``accepted`` column), instead of handing back wrong values. The meta columns are
chunked for that (the filter needs chunks). Chunks encoded outside HDF5
(:func:`encode_pair`) carry the same checksum (:func:`storage.hashing.hdf5_fletcher32`).

**Versions.** ``format_version`` 2 is version 1 plus the checksums (and ``file_id``);
the design contract allows 2 for exactly this. Plain h5py reads both the same way.
This code reads version 1 files (no checksums, contiguous meta) as before, and
reports a version 2 file with a dataset lacking the filter as damaged: something
rewrote it. Within version 1, text columns moved from the ASCII to the UTF-8 flag
without a bump (old readers read the new files correctly); files of the first writer
hold UTF-8 bytes under the ASCII flag, and this reader decodes every text column as
UTF-8 (ASCII is a subset), so those stay readable (with h5py alone,
``.asstr(encoding="utf-8")``). Any other version, ``1.7`` included, is refused with
a one-line :class:`DatasetFormatError`.

:func:`validate` checks values as well as shapes (labels 0/1, stage 0..5, split and
label_source names, column dtypes, attribute types, no subgroups in /meta, text
that decodes), reads every meta column and label chunk (their checksums with them)
and, with ``deep=True``, every image chunk, so damaged bytes are found before training
trips on them. It raises nothing but DatasetFormatError.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np
import pandas as pd

from storage.atomic import RecordingFile, atomic_path
from storage.errors import DatasetFormatError
from storage.hashing import hdf5_fletcher32

FORMAT_NAME = "brvo-paired"
FORMAT_VERSION = 2
#: versions this code reads (see the module docstring)
SUPPORTED_VERSIONS = (1, 2)
#: first version whose every dataset carries the Fletcher32 checksum
CHECKSUMMED_SINCE = 2
#: what to do about a damaged file: true, since a rerun checks its outputs' bytes (tasks.engine)
REPAIR_ADVICE = "re-run the step or flow that wrote it (a rerun rewrites an output whose bytes changed)"
#: encoding of text columns (fixed-length strings, HDF5 character set UTF-8)
TEXT_ENCODING = "utf-8"
STAGE_NAMES = ("s1t1", "s1t2", "s2t1", "s2t2", "s3t1", "s3t2")
SPLITS = ("train", "val", "test")
LABEL_SOURCES = ("annotation", "pix2pix")

#: Required meta columns and their numpy kind ('S' string, 'i' int, 'b' bool).
REQUIRED_META: dict[str, str] = {
    "patient_id": "S",
    "stage": "i",
    "exam_id": "S",
    "subset": "S",
    "split": "S",
    "is_synthetic": "b",
    "label_source": "S",
}
#: Per-sample score columns (float32, NaN where not applicable, e.g. for real rows).
SCORE_COLUMNS = ("consistency_ssim", "realism", "density_z", "label_confidence")
#: Optional columns the augmented file adds; real rows get the defaults shown.
OPTIONAL_META_DEFAULTS: dict[str, Any] = {
    "accepted": True,
    "sample_seed": -1,
    "sample_index": -1,
}
REQUIRED_ATTRS = ("format", "format_version", "created_utc", "image_size", "n_real", "n_synthetic")

#: name -> (h5py compression, compression_opts). 'none' exists for benchmarks only:
#: the format requires compressed images.
COMPRESSIONS: dict[str, tuple[str | None, int | None]] = {
    "gzip-1": ("gzip", 1),
    "gzip-4": ("gzip", 4),
    "lzf": ("lzf", None),
    "none": (None, None),
}
DEFAULT_COMPRESSION = "gzip-1"


def code_version() -> str:
    """Package version plus git commit when run from a checkout (provenance attribute)."""
    from importlib import metadata

    try:
        version = metadata.version("brvo-augment")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = head.parent / ref[5:]
            commit = ref_file.read_text().strip() if ref_file.exists() else ""
        else:
            commit = ref
        if commit:
            version += f"+g{commit[:10]}"
    except OSError:
        pass
    return version


class PairedDatasetWriter:
    """Stream (image, label, meta) rows into a new 'brvo-paired' file, atomically.

    Rows are appended in batches; images go straight to disk chunk by chunk, so
    memory does not grow with N (only the small meta columns are kept). The file
    appears at ``path`` only when :meth:`close` succeeds; on an exception inside
    the ``with`` block nothing is left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        *,
        compression: str = DEFAULT_COMPRESSION,
        attrs: Mapping[str, Any] | None = None,
        extra_columns: Iterable[str] = (),
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; choose one of {sorted(COMPRESSIONS)}")
        self.path = Path(path)
        self.image_size = int(image_size)
        self.compression = compression
        self.attrs = dict(attrs or {})
        self._columns: dict[str, list] = {k: [] for k in REQUIRED_META}
        for k in SCORE_COLUMNS:
            self._columns[k] = []
        for k in OPTIONAL_META_DEFAULTS:
            self._columns[k] = []
        for k in extra_columns:
            self._columns.setdefault(k, [])
        self._n = 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            # through a RecordingFile: a full disk is a DiskFullError, not a crash in HDF5 (storage/atomic.py)
            self._sink = RecordingFile(self._tmp)
            self._file = h5py.File(self._sink, "w")
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            raise
        comp, opts = COMPRESSIONS[compression]
        shape = (0, self.image_size, self.image_size)
        maxshape = (None, self.image_size, self.image_size)
        chunks = (1, self.image_size, self.image_size)
        kw = dict(dtype=np.uint8, chunks=chunks, maxshape=maxshape, compression=comp, compression_opts=opts,
                  fletcher32=True)
        if comp is not None:
            kw["shuffle"] = False
        self._images = self._file.create_dataset("images", shape=shape, **kw)
        self._labels = self._file.create_dataset("labels", shape=shape, **kw)
        self._closed = False

    def __enter__(self) -> "PairedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc_type, exc, tb)

    def __len__(self) -> int:
        return self._n

    def append(self, images: np.ndarray, labels: np.ndarray, rows: pd.DataFrame | Mapping[str, Iterable]) -> None:
        """Append a batch: ``images``/``labels`` uint8 (n, H, W); ``rows`` one entry per image."""
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim == 2:
            images, labels = images[None], labels[None]
        n = images.shape[0]
        expected = (n, self.image_size, self.image_size)
        if images.shape != expected or labels.shape != expected:
            raise ValueError(f"batch shapes {images.shape}/{labels.shape}, expected {expected}")
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ValueError(f"images and labels must be uint8, got {images.dtype}/{labels.dtype}")
        if labels.size and labels.max() > 1:
            raise ValueError("labels must be 0/1 (binarise before writing)")
        columns = self._meta_values(rows, n)
        start = self._n
        self._images.resize(start + n, axis=0)
        self._labels.resize(start + n, axis=0)
        self._images[start : start + n] = images
        self._labels[start : start + n] = labels
        self._sink.raise_if_failed(self.path)
        self._commit(columns, n)

    def append_encoded(
        self, image_chunks: Sequence[bytes], label_chunks: Sequence[bytes], rows: pd.DataFrame | Mapping[str, Iterable]
    ) -> None:
        """Append rows whose chunks were already encoded by :func:`encode_pair` with this writer's
        compression (e.g. in worker processes, so compression runs in parallel); the bytes are
        stored as they are (``write_direct_chunk``)."""
        if self.compression not in ENCODABLE:
            raise ValueError(f"compression {self.compression!r} has no Python encoder; use append()")
        n = len(image_chunks)
        if len(label_chunks) != n:
            raise ValueError(f"{n} image chunks but {len(label_chunks)} label chunks")
        columns = self._meta_values(rows, n)
        start = self._n
        self._images.resize(start + n, axis=0)
        self._labels.resize(start + n, axis=0)
        for i, (im, lab) in enumerate(zip(image_chunks, label_chunks)):
            self._images.id.write_direct_chunk((start + i, 0, 0), im)
            self._labels.id.write_direct_chunk((start + i, 0, 0), lab)
        self._sink.raise_if_failed(self.path)
        self._commit(columns, n)

    def _meta_values(self, rows: pd.DataFrame | Mapping[str, Iterable], n: int) -> dict[str, list]:
        """Every column's values for a batch, checked before anything is stored (columns stay aligned)."""
        table = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
        if len(table) != n:
            raise ValueError(f"{len(table)} meta rows for {n} images")
        missing = [k for k in REQUIRED_META if k not in table]
        if missing:
            raise ValueError(f"meta rows lack columns {missing}")
        out = {}
        for k in self._columns:
            if k in table:
                out[k] = table[k].tolist()
            elif k in SCORE_COLUMNS:
                out[k] = [np.nan] * n
            elif k in OPTIONAL_META_DEFAULTS:
                out[k] = [OPTIONAL_META_DEFAULTS[k]] * n
            else:
                raise ValueError(f"meta rows lack extra column {k!r}")
        return out

    def _commit(self, columns: dict[str, list], n: int) -> None:
        for k, values in columns.items():
            self._columns[k].extend(values)
        self._n += n

    def close(self) -> Path:
        """Write meta and attributes, then move the file into place atomically."""
        if self._closed:
            return self.path
        try:
            return self._finish()
        except BaseException:  # e.g. a meta column that cannot be stored: leave nothing behind
            self.abort(*sys.exc_info())
            raise

    def _finish(self) -> Path:
        meta = self._file.create_group("meta")
        for name, values in self._columns.items():
            meta.create_dataset(name, data=_column_array(name, values), chunks=True, fletcher32=True)
        syn = np.asarray(self._columns["is_synthetic"], dtype=bool)
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "image_size": self.image_size,
            "n_real": int((~syn).sum()),
            "n_synthetic": int(syn.sum()),
            "compression": self.compression,
            "code_version": code_version(),
            "stage_names": json.dumps(STAGE_NAMES),
            "file_id": uuid.uuid4().hex,  # tells two writes of one path apart (storage.torch_dataset pins it)
        }
        for k, v in self.attrs.items():
            attrs[k] = v if isinstance(v, (str, int, float, np.integer, np.floating)) else json.dumps(v)
        for k, v in attrs.items():
            self._file.attrs[k] = v
        self._file.close()
        self._sink.close()
        self._sink.raise_if_failed(self.path)
        self._closed = True
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self, *exc_info) -> None:
        """Discard the file: nothing appears at ``path``. A recorded write error (a full disk
        above all) is raised in place of the exception that made the caller abort."""
        if self._closed:
            return
        self._closed = True
        recorded = close_error = None
        try:
            try:
                self._file.close()
            finally:
                self._sink.close()
        except Exception as exc:
            close_error = exc
        try:
            self._sink.raise_if_failed(self.path)
        except BaseException as exc:  # the write error behind whatever the caller saw
            recorded = exc
        if recorded is None and close_error is not None and (not exc_info or exc_info[0] is None):
            recorded = close_error
        if recorded is not None:
            exc_info = (type(recorded), recorded, recorded.__traceback__)
        elif not exc_info or exc_info[0] is None:
            exc_info = (_Aborted, _Aborted(), None)
        self._ctx.__exit__(*exc_info)  # removes the temporary file, commits nothing
        if recorded is not None:
            raise recorded


class _Aborted(Exception):
    """Thrown into atomic_path when a writer is aborted without an error, so nothing is committed."""


#: compressions whose chunk bytes :func:`encode_pair` can produce without HDF5 (lzf cannot).
ENCODABLE = ("gzip-1", "gzip-4", "none")


def encode_pair(image: np.ndarray, label: np.ndarray, compression: str) -> tuple[bytes, bytes]:
    """One row's image and label as the chunk bytes a writer with ``compression`` stores
    (gzip-N: a zlib stream at level N, which is HDF5's deflate filter; none: raw bytes),
    each followed by its Fletcher32 checksum as HDF5's filter appends it.
    Checks what :meth:`PairedDatasetWriter.append` checks: 2-D, square, uint8, label 0/1."""
    if compression not in ENCODABLE:
        raise ValueError(f"compression {compression!r} cannot be encoded outside HDF5; choose one of {ENCODABLE}")
    image, label = np.ascontiguousarray(image), np.ascontiguousarray(label)
    if image.ndim != 2 or image.shape[0] != image.shape[1] or label.shape != image.shape:
        raise ValueError(f"pair shapes {image.shape}/{label.shape}, expected two equal (S, S)")
    if image.dtype != np.uint8 or label.dtype != np.uint8:
        raise ValueError(f"images and labels must be uint8, got {image.dtype}/{label.dtype}")
    if label.size and label.max() > 1:
        raise ValueError("labels must be 0/1 (binarise before writing)")
    _, level = COMPRESSIONS[compression]
    if level is None:
        return _with_checksum(image.tobytes()), _with_checksum(label.tobytes())
    return _with_checksum(zlib.compress(image.tobytes(), level)), _with_checksum(zlib.compress(label.tobytes(), level))


def _with_checksum(chunk: bytes) -> bytes:
    return chunk + hdf5_fletcher32(chunk).to_bytes(4, "little")


def _column_array(name: str, values: list) -> np.ndarray:
    kind = REQUIRED_META.get(name)
    if name in SCORE_COLUMNS:
        return np.asarray(values, dtype=np.float32)
    if kind == "S" or (kind is None and values and isinstance(values[0], str)):
        return text_array(values)
    if kind == "i":
        return np.asarray(values, dtype=np.int16)
    if kind == "b" or name == "accepted":
        return np.asarray(values, dtype=bool)
    arr = np.asarray(values)
    if not values and name in OPTIONAL_META_DEFAULTS:  # an empty file: the type of the column's default
        arr = arr.astype(np.asarray(OPTIONAL_META_DEFAULTS[name]).dtype)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return arr


def text_array(values: Iterable) -> np.ndarray:
    """Fixed-length UTF-8 strings (HDF5 character set UTF-8) of ``values`` (see the module docstring)."""
    encoded = [str(v).encode(TEXT_ENCODING) for v in values]
    width = max([len(e) for e in encoded] + [1])
    return np.asarray(encoded, dtype=h5py.string_dtype(TEXT_ENCODING, width))


def decode_text(ds: h5py.Dataset) -> np.ndarray:
    """A text column as Python str (object array), decoded as UTF-8 whatever its declared set."""
    return np.asarray(ds.asstr(encoding=TEXT_ENCODING)[:], dtype=object)


# ---------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`validate` learned about a file."""

    path: Path
    n: int
    n_real: int
    n_synthetic: int
    image_size: int
    attrs: dict = field(default_factory=dict)


#: kind each optional column must have when present ('f' float, 'b' bool, 'i' int)
OPTIONAL_KINDS: dict[str, str] = {**{k: "f" for k in SCORE_COLUMNS}, "accepted": "b", "sample_seed": "i",
                                  "sample_index": "i"}
#: rows read at once when checking every label/image chunk (about 32 MB of pixels)
_CHECK_BLOCK_BYTES = 32 << 20


def validate(path: str | os.PathLike, *, deep: bool = False) -> DatasetSummary:
    """Check ``path`` against the format contract; raise :class:`DatasetFormatError` with one clear line.

    Checks attributes (types and values), shapes, dtypes, every meta column's kind and
    values (stage 0..5, split, label_source, text that decodes as UTF-8) and every label
    (0/1 only; labels are read in full: measured 0.01 s -> 0.5 s for 1000 rows at 256 px
    on 2 busy cores, 59 MB file; a consumer that trips on a 255 costs far more). Every
    meta column is read in full too (N values each), so a damaged one fails its checksum
    here; a version 2 file must carry the checksum on every dataset.
    ``deep=True`` also reads every image chunk, so damaged image bytes are found here
    and not in the middle of training. Nothing but DatasetFormatError leaves this function:
    whatever h5py, numpy or the decoder raise on a damaged file is reported as one line.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetFormatError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - any failure to open means "not a readable HDF5 file"
        raise DatasetFormatError(f"{path}: not a readable HDF5 file ({_first_line(exc)}); {REPAIR_ADVICE}") from None
    try:
        with f:
            return _validate_open(path, f, deep)
    except DatasetFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file may fail anywhere in h5py/numpy; one line, no traceback
        raise DatasetFormatError(f"{path}: cannot be read as a {FORMAT_NAME} dataset ({_first_line(exc)[:160]}); "
                                 f"{REPAIR_ADVICE}") from None


def _validate_open(path: Path, f: h5py.File, deep: bool) -> DatasetSummary:
    def bad(message: str) -> DatasetFormatError:
        return DatasetFormatError(f"{path}: {message}")

    fmt = _attr_str(f.attrs.get("format"))
    if fmt != FORMAT_NAME:
        raise bad(f"format is {fmt!r}, expected {FORMAT_NAME!r}; is this a brvo-augment dataset?")
    version = _attr_py(f.attrs.get("format_version"))
    if not (_is_int(version) and version in SUPPORTED_VERSIONS):
        raise bad(f"format_version {version!r}, this code reads version "
                  f"{' or '.join(map(str, SUPPORTED_VERSIONS))}; re-run preprocess (or export) with this version")
    for a in REQUIRED_ATTRS:
        if a not in f.attrs:
            raise bad(f"missing root attribute {a!r}")
    for a in ("image_size", "n_real", "n_synthetic"):
        value = _attr_py(f.attrs[a])
        if not _is_int(value) or value < (1 if a == "image_size" else 0):
            raise bad(f"root attribute {a!r} is {value!r}, expected a {'positive' if a == 'image_size' else 'non-negative'} integer")
    for key in ("images", "labels"):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise bad(f"missing dataset /{key}")
    images, labels = f["images"], f["labels"]
    size = int(f.attrs["image_size"])
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise bad(f"/images has shape {images.shape}, expected (N, {size}, {size})")
    if labels.shape != images.shape:
        raise bad(f"/labels shape {labels.shape} differs from /images {images.shape}")
    for key, ds in (("images", images), ("labels", labels)):
        if ds.dtype != np.uint8:
            raise bad(f"/{key} dtype is {ds.dtype}, expected uint8")
    n = images.shape[0]
    if "meta" not in f or not isinstance(f["meta"], h5py.Group):
        raise bad("missing group /meta")
    meta = f["meta"]
    for col in meta:
        ds = meta.get(col)
        if not isinstance(ds, h5py.Dataset):
            raise bad(f"/meta/{col} is not a column (a group or link); /meta holds only 1-D datasets")
        if ds.shape != (n,):
            raise bad(f"meta column {col!r} has shape {ds.shape}, expected ({n},)")
    for col in REQUIRED_META:
        if col not in meta:
            raise bad(f"missing meta column {col!r}")
    kinds = {**REQUIRED_META, **OPTIONAL_KINDS}
    columns: dict[str, np.ndarray] = {}
    for col in meta:
        ds = meta[col]
        kind = kinds.get(col)
        if kind is not None and not _kind_ok(ds.dtype, kind):
            want = {"S": "text", "i": "integer", "b": "bool", "f": "float"}[kind]
            raise bad(f"meta column {col!r} has dtype {ds.dtype}, expected {want}")
        columns[col] = _read_column(bad, col, ds)
        if h5py.check_string_dtype(ds.dtype) is not None:
            _check_text(bad, col, columns[col])
    stage = columns["stage"]
    out = np.flatnonzero((stage < 0) | (stage >= len(STAGE_NAMES)))
    if out.size:
        raise bad(f"meta column 'stage' holds {int(stage[out[0]])} at row {int(out[0])}; stages are 0..5")
    for col, allowed in (("split", SPLITS), ("label_source", LABEL_SOURCES)):
        values = np.asarray([v.decode(TEXT_ENCODING) if isinstance(v, bytes) else str(v) for v in columns[col]],
                            dtype=object)
        wrong = np.flatnonzero(~np.isin(values, allowed))
        if wrong.size:
            raise bad(f"meta column {col!r} holds {values[wrong[0]]!r} at row {int(wrong[0])}; "
                      f"allowed: {', '.join(allowed)}")
    n_syn = int(columns["is_synthetic"].sum())
    if int(f.attrs["n_synthetic"]) != n_syn or int(f.attrs["n_real"]) != n - n_syn:
        raise bad("attributes n_real/n_synthetic disagree with meta/is_synthetic")
    if version >= CHECKSUMMED_SINCE:
        datasets = {"images": images, "labels": labels, **{f"meta/{c}": meta[c] for c in meta}}
        unguarded = [name for name, ds in datasets.items() if not ds.fletcher32]
        if unguarded:
            raise bad(f"/{unguarded[0]} has no Fletcher32 checksum, which format_version {version} puts on every "
                      f"dataset: the file was changed after it was written; {REPAIR_ADVICE}")
    _check_pixels(bad, "labels", labels, max_value=1)
    if deep:
        _check_pixels(bad, "images", images, max_value=None)
    attrs = {k: _attr_py(v) for k, v in f.attrs.items()}
    return DatasetSummary(path=path, n=n, n_real=n - n_syn, n_synthetic=n_syn, image_size=size, attrs=attrs)


def _read_column(bad, col: str, ds: h5py.Dataset) -> np.ndarray:
    """A meta column's stored values; a chunk that fails its checksum (or cannot be read) is named."""
    try:
        return ds[:]
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError on a failed checksum; others mean damage too
        raise bad(f"/meta/{col} cannot be read ({_first_line(exc)[:100]}): the file is damaged; "
                  f"{REPAIR_ADVICE}") from None


def _check_text(bad, col: str, raw: np.ndarray) -> None:
    for i, value in enumerate(raw):
        if isinstance(value, bytes):
            try:
                value.decode(TEXT_ENCODING)
            except UnicodeDecodeError:
                raise bad(f"meta column {col!r} row {i} is not UTF-8 text ({value[:20]!r}); "
                          f"{REPAIR_ADVICE}") from None


def _check_pixels(bad, key: str, ds: h5py.Dataset, max_value: int | None) -> None:
    """Read every chunk of ``ds`` (block by block); name the first row that cannot be read
    or that holds a value above ``max_value``."""
    n = ds.shape[0]
    row_bytes = max(1, int(np.prod(ds.shape[1:])))
    block = max(1, _CHECK_BLOCK_BYTES // row_bytes)
    for start in range(0, n, block):
        stop = min(n, start + block)
        try:
            values = ds[start:stop]
        except Exception:  # noqa: BLE001 - find the damaged row, then report it
            for row in range(start, stop):
                try:
                    ds[row]
                except Exception as exc:  # noqa: BLE001
                    raise bad(f"/{key} row {row} cannot be read ({_first_line(exc)[:100]}): the file is damaged; "
                              f"{REPAIR_ADVICE}") from None
            raise
        if max_value is not None and values.size and int(values.max()) > max_value:
            row = start + int(np.flatnonzero(values.reshape(len(values), -1).max(axis=1) > max_value)[0])
            raise bad(f"/{key} row {row} holds value {int(ds[row].max())}; {key} must be 0/1 (vessel = 1)")


def read_meta(path: str | os.PathLike) -> pd.DataFrame:
    """All meta columns as a DataFrame (strings decoded), index = row number in the file."""
    with h5py.File(path, "r") as f:
        return meta_frame(f)


def meta_frame(f: h5py.File) -> pd.DataFrame:
    """The meta columns of an open file; text decoded as UTF-8 (see the module docstring)."""
    cols = {}
    for k in f["meta"]:
        ds = f["meta"][k]
        cols[k] = decode_text(ds) if h5py.check_string_dtype(ds.dtype) is not None else ds[:]
    return pd.DataFrame(cols)


def read_arrays(path: str | os.PathLike, rows: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels (uint8) for ``rows`` (sorted or not), or for all rows."""
    with h5py.File(path, "r") as f:
        if rows is None:
            return f["images"][:], f["labels"][:]
        idx = np.asarray(list(rows), dtype=np.int64)
        if idx.size == 0:
            size = f["images"].shape[1:]
            return np.zeros((0, *size), np.uint8), np.zeros((0, *size), np.uint8)
        order = np.argsort(idx)
        inverse = np.argsort(order)
        sorted_idx = idx[order]
        uniq, back = np.unique(sorted_idx, return_inverse=True)
        imgs = f["images"][uniq][back][inverse]
        labs = f["labels"][uniq][back][inverse]
        return imgs, labs


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    if kind == "S":
        return h5py.check_string_dtype(dtype) is not None
    if kind == "i":
        return dtype.kind in "iu"
    if kind == "b":
        return dtype.kind == "b"
    if kind == "f":
        return dtype.kind == "f"
    return True


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _attr_str(v) -> str | None:
    if isinstance(v, bytes):
        return v.decode()
    return None if v is None else str(v)


def _attr_py(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
