"""A torch Dataset over a 'brvo-paired' file that opens the HDF5 file lazily, once per worker.

h5py handles must not cross a fork, so the file is opened on first access inside
each DataLoader worker process (and re-opened if the process id changes).

The Dataset keeps the index and meta of the file it read at construction, so it pins
that file (:class:`FilePin`) and checks every later open against it: a worker that
opened a rerun's rewrite of the same path would pair new images with old meta.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from storage.errors import DatasetFormatError
from storage.paired_format import REPAIR_ADVICE, meta_frame, validate


@dataclass(frozen=True)
class FilePin:
    """What tells one write of a path from another, cheaply (no hash of the whole file): the
    writer's random ``file_id`` and ``created_utc`` (version 1 files have no id), plus the file's
    size and mtime, which an in-place edit changes."""

    file_id: str
    created_utc: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, f: h5py.File) -> "FilePin":
        st = os.stat(path)
        return cls(file_id=_text(f.attrs.get("file_id", "")), created_utc=_text(f.attrs.get("created_utc", "")),
                   size=st.st_size, mtime_ns=st.st_mtime_ns)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PairedImageDataset(Dataset):
    """Rows of a 'brvo-paired' file as ``(image, label, meta)``.

    ``image`` is float32 (1, H, W) in [0, 1]; ``label`` float32 (1, H, W) in {0, 1};
    ``meta`` a dict of that row's meta columns (plus ``row``, its index in the file).
    Filters: ``split`` ('train' | 'val' | 'test' or a tuple of them), ``is_synthetic``
    (True / False / None for both) and ``accepted_only`` (drop rejected synthetic rows).
    ``transform(image, label) -> (image, label)`` runs on the tensors, e.g. aligned flips.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | tuple[str, ...] | None = None,
        is_synthetic: bool | None = None,
        accepted_only: bool = False,
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.path = Path(path)
        validated = validate(self.path)
        with h5py.File(self.path, "r") as f:
            self.pin = FilePin.of(self.path, f)
            meta = meta_frame(f)
        if (self.pin.file_id, self.pin.created_utc) != (_text(validated.attrs.get("file_id", "")),
                                                        _text(validated.attrs.get("created_utc", ""))):
            raise DatasetFormatError(f"{self.path} was rewritten while this Dataset was indexing it; "
                                     f"create the Dataset again")
        meta["row"] = np.arange(len(meta))
        keep = np.ones(len(meta), dtype=bool)
        if split is not None:
            splits = (split,) if isinstance(split, str) else tuple(split)
            keep &= meta["split"].isin(splits).to_numpy()
        if is_synthetic is not None:
            keep &= meta["is_synthetic"].to_numpy(dtype=bool) == bool(is_synthetic)
        if accepted_only and "accepted" in meta:
            keep &= meta["accepted"].to_numpy(dtype=bool)
        self.meta = meta[keep].reset_index(drop=True)
        self.rows = self.meta["row"].to_numpy()
        # per-row dicts built once: a pandas row lookup per item costs more than reading the image
        self._records = [
            {k: (v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()}
            for rec in self.meta.to_dict("records")
        ]
        self.transform = transform
        self._file: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._labels: h5py.Dataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            handle = h5py.File(self.path, "r")
            try:
                if FilePin.of(self.path, handle) != self.pin:
                    raise self._rewritten()
            except BaseException:
                handle.close()
                raise
            self._file = handle
            # keep the dataset handles: looking /images up by name costs ~0.3 ms per access
            self._images, self._labels = self._file["images"], self._file["labels"]
            self._pid = os.getpid()
        return self._file

    def _rewritten(self) -> DatasetFormatError:
        return DatasetFormatError(f"{self.path} was rewritten since this Dataset indexed it; create a new Dataset")

    def _read(self, key: str, dataset: h5py.Dataset, row: int) -> np.ndarray:
        try:
            return dataset[row]
        except OSError as exc:  # a chunk that fails its checksum or its decompression
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DatasetFormatError(f"{self.path}: /{key} row {row} cannot be read ({first[:100]}): the file is "
                                     f"damaged; {REPAIR_ADVICE}") from None

    def __getitem__(self, i: int):
        self._handle()
        row = int(self.rows[i])
        image = torch.from_numpy(self._read("images", self._images, row).astype(np.float32) / 255.0)[None]
        label_u8 = self._read("labels", self._labels, row)
        if label_u8.max(initial=0) > 1:  # validate() checked every label; this guards a file changed since
            raise DatasetFormatError(f"{self.path}: /labels row {row} holds value {int(label_u8.max())}; "
                                     f"labels must be 0/1 (vessel = 1)")
        label = torch.from_numpy(label_u8.astype(np.float32))[None]
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label, dict(self._records[i])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_images"] = state["_labels"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._images = self._labels = None
