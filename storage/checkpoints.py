"""Checkpoints: atomic torch.save with a sha256, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors, state dicts and plain values (config as JSON,
metrics as floats). The sha256 of the file is written beside it
(``<name>.pt.sha256``) after the file is in place, so a file whose digest does
not match is known to be interrupted or altered and is refused.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from storage.atomic import atomic_path, write_text_atomic
from storage.errors import CheckpointError
from storage.hashing import file_sha256


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> str:
    """Write ``payload`` to ``path`` atomically; return its sha256 (also stored beside it)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        digest = file_sha256(tmp)
    write_text_atomic(_sha_path(path), digest + "\n")
    return digest


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint safely; verify its sha256 and that ``expect`` keys match its ``meta``.

    ``expect`` holds values the caller needs to agree (e.g. ``{"model": "pix2pix",
    "image_size": 64, "config_hash": ...}``); any difference raises a one-line
    :class:`CheckpointError` naming the field and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found; train the model first")
    sha_file = _sha_path(path)
    if sha_file.exists():
        recorded = sha_file.read_text().strip()
        actual = file_sha256(path)
        if recorded != actual:
            raise CheckpointError(
                f"{path}: sha256 mismatch (interrupted or altered checkpoint); delete it to retrain from the previous one"
            )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint safely ({first[:160]}); delete it and retrain") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a brvo-augment checkpoint (got {type(payload).__name__})")
    meta = payload.get("meta", {})
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have != want:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={have!r} but this run needs {want!r}; "
                f"use a fresh run directory or delete {path.parent}"
            )
    return payload


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The recorded sha256 of a checkpoint (computed if the sidecar is missing)."""
    sha_file = _sha_path(Path(path))
    return sha_file.read_text().strip() if sha_file.exists() else file_sha256(path)


def _sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
