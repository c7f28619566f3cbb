"""Intermediate files between fill, label and score (RUN_DIR/work/*.h5).

A private, simple layout (one dataset per named array, attrs for provenance),
written atomically, so steps exchange paths and never big arrays through Prefect. Every
dataset carries HDF5's Fletcher32 checksum, as the paired format's do, so a damaged chunk is
an error naming the file when it is read, never wrong numbers handed to the next step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import pandas as pd

from storage.atomic import atomic_path, open_h5_for_writing
from storage.errors import DatasetFormatError
from storage.paired_format import decode_text, text_array


def _create_checked(group: h5py.Group, name: str, data: np.ndarray, **kwargs: Any) -> None:
    """A dataset with a Fletcher32 checksum on every chunk (a scalar cannot be chunked, so has none)."""
    if data.ndim == 0:
        group.create_dataset(name, data=data)
        return
    group.create_dataset(name, data=data, chunks=kwargs.pop("chunks", True), fletcher32=True, **kwargs)


def write_work_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], table: pd.DataFrame | None = None,
                    attrs: Mapping[str, Any] | None = None) -> Path:
    """Arrays (images compressed, chunked per row) + an optional table of per-row columns."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open_h5_for_writing(tmp, path) as f:  # a full disk: DiskFullError, not a crash in HDF5
            for name, arr in arrays.items():
                arr = np.asarray(arr)
                if arr.ndim == 3 and arr.shape[0] > 0:
                    _create_checked(f, name, arr, chunks=(1, *arr.shape[1:]), compression="gzip",
                                    compression_opts=1)
                else:
                    _create_checked(f, name, arr)
            if table is not None:
                g = f.create_group("table")
                for col in table.columns:
                    values = table[col].to_numpy()
                    if values.dtype == object:
                        values = text_array(values)  # UTF-8: patient ids need not be ASCII
                    _create_checked(g, col, values)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
    return path


def _read(path: str | os.PathLike, what: str, read):
    """``read(f)`` on the open file; a chunk that fails its checksum (or any HDF5 read error) is one line."""
    try:
        with h5py.File(path, "r") as f:
            return read(f)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetFormatError(f"{path}: {what} cannot be read ({reason}): the work file is damaged; "
                                 "re-run the flow (a rerun rewrites an output whose bytes changed)") from exc


def read_work_table(path: str | os.PathLike) -> pd.DataFrame:
    def table(f: h5py.File) -> pd.DataFrame:
        if "table" not in f:
            return pd.DataFrame()
        return pd.DataFrame({k: (decode_text(f["table"][k]) if h5py.check_string_dtype(f["table"][k].dtype)
                                 else f["table"][k][:]) for k in f["table"]})

    return _read(path, "its table", table)


def read_work_array(path: str | os.PathLike, name: str) -> np.ndarray:
    return _read(path, f"/{name}", lambda f: f[name][:])
