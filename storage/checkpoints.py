"""Checkpoints: atomic torch.save with a sha256, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors, state dicts and plain values (config as JSON,
metrics as floats). Its sha256 sidecar (``<name>.pt.sha256``) is committed *before*
the checkpoint and also names the checkpoint it replaces (storage/checkpoint_digest.py),
so a kill between the two renames leaves an older checkpoint that still verifies. A
file whose digest the sidecar does not vouch for, or one without a sidecar, is refused.
A full disk while saving is a one-line DiskFullError (storage/atomic.py); weights that
do not fit the network they are loaded into are a one-line CheckpointError
(:func:`state_must_fit`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from storage.atomic import atomic_path
from storage.checkpoint_digest import previous_digest, verified_sha256, write_sidecar
from storage.errors import CheckpointError
from storage.hashing import file_sha256


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> str:
    """Write ``payload`` to ``path`` atomically; return its sha256 (also stored beside it)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # a file object, not a path: torch then reports a full disk with the OSError as its context
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
        digest = file_sha256(tmp)
        write_sidecar(path, digest, previous=previous_digest(path))  # committed before the checkpoint
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
    verified_sha256(path)  # a missing sidecar or a digest it does not vouch for: refused
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
    """The sha256 of a checkpoint, verified against its sidecar (CheckpointError if it cannot be)."""
    return verified_sha256(path)


@contextlib.contextmanager
def state_must_fit(path: str | os.PathLike) -> Iterator[None]:
    """Around ``load_state_dict`` calls: a tensor of another shape, a missing or an extra key
    becomes a one-line CheckpointError naming ``path`` instead of a RuntimeError traceback."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise CheckpointError(f"{path}: its weights do not fit this network ({detail[:200]}); it was saved for "
                              f"another architecture or altered: delete it and retrain") from None

