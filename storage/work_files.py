"""Intermediate files between fill, label and score (RUN_DIR/work/*.h5).

A private, simple layout (one dataset per named array, attrs for provenance),
written atomically, so steps exchange paths and never big arrays through Prefect.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import pandas as pd

from storage.atomic import atomic_path, open_h5_for_writing
from storage.paired_format import decode_text, text_array


def write_work_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], table: pd.DataFrame | None = None,
                    attrs: Mapping[str, Any] | None = None) -> Path:
    """Arrays (images compressed, chunked per row) + an optional table of per-row columns."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open_h5_for_writing(tmp, path) as f:  # a full disk: DiskFullError, not a crash in HDF5
            for name, arr in arrays.items():
                arr = np.asarray(arr)
                if arr.ndim == 3 and arr.shape[0] > 0:
                    f.create_dataset(name, data=arr, chunks=(1, *arr.shape[1:]), compression="gzip",
                                     compression_opts=1)
                else:
                    f.create_dataset(name, data=arr)
            if table is not None:
                g = f.create_group("table")
                for col in table.columns:
                    values = table[col].to_numpy()
                    if values.dtype == object:
                        values = text_array(values)  # UTF-8: patient ids need not be ASCII
                    g.create_dataset(col, data=values)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
    return path


def read_work_table(path: str | os.PathLike) -> pd.DataFrame:
    with h5py.File(path, "r") as f:
        if "table" not in f:
            return pd.DataFrame()
        return pd.DataFrame({k: (decode_text(f["table"][k]) if h5py.check_string_dtype(f["table"][k].dtype)
                                 else f["table"][k][:]) for k in f["table"]})


def read_work_array(path: str | os.PathLike, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][:]
