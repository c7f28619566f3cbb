"""A torch Dataset over a 'brvo-paired' file that opens the HDF5 file lazily, once per worker.

h5py handles must not cross a fork, so the file is opened on first access inside
each DataLoader worker process (and re-opened if the process id changes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from storage.errors import DatasetFormatError
from storage.paired_format import meta_frame, validate


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
        validate(self.path)
        with h5py.File(self.path, "r") as f:
            meta = meta_frame(f)
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
            self._file = h5py.File(self.path, "r")
            # keep the dataset handles: looking /images up by name costs ~0.3 ms per access
            self._images, self._labels = self._file["images"], self._file["labels"]
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, i: int):
        self._handle()
        row = int(self.rows[i])
        image = torch.from_numpy(self._images[row].astype(np.float32) / 255.0)[None]
        label_u8 = self._labels[row]
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
