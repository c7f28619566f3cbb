"""Cheap checks before any work: those every training step makes on RUN_DIR/soul.h5, and the
model registry's before a retrain.

Shared by Pix2Pix and CRGAN so both refuse a missing, invalid or wrong-size soul.h5
with the same one-line message; each model adds its own checks (held-out split,
checkpoint identity) after this. A retrain checks its registry here, before the
fingerprint, ingest and preprocess, so a registry it cannot publish to costs nothing.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from storage.errors import BrvoError
from storage.paired_format import validate
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths


def require_soul_h5(run_dir: str | os.PathLike, image_size: int, supports_size: Callable[[int], Any],
                    soul_h5: str | os.PathLike | None = None) -> Path:
    """soul.h5's path (``soul_h5``, default RUN_DIR/soul.h5) once it exists, validates, holds ``image_size`` px
    images, and the model can be built at that size (``supports_size`` raises ValueError when not); else a
    BrvoError."""
    soul = Path(soul_h5) if soul_h5 is not None else RunPaths.of(run_dir).soul_h5
    if not soul.is_file():
        raise BrvoError(f"{soul}: not found; run preprocess first (brvo-augment preprocess {run_dir})")
    summary = validate(soul)  # DatasetFormatError: one line naming the problem
    if summary.image_size != image_size:
        raise BrvoError(f"{soul}: images are {summary.image_size} px but the config asks for {image_size} px; "
                        f"re-run preprocess with this config or use a config with image_size={summary.image_size}")
    try:
        supports_size(image_size)
    except ValueError as exc:
        raise BrvoError(f"{exc}; choose image_size 32, 64, 128, 256 or 512") from None
    return soul


def preflight_registry(registry_dir: str | os.PathLike) -> None:
    """Refuse, in one line, a model registry a retrain could not use: a path that is not a directory, one
    it cannot create or write to (it writes versions, last_retrain.json, its lock and its work directory
    there, even when nothing changed), or a broken 'latest' pointer (the version to compare new models with).

    Writability is probed by creating and removing a file, not by permission bits: a read-only mount, an
    immutable directory or a full quota refuse what ``os.access`` would allow."""
    root = Path(registry_dir)
    if root.exists() and not root.is_dir():
        raise BrvoError(f"model registry {root} is not a directory; pass a directory as registry_dir "
                        f"(or set BRVO_REGISTRY_DIR to one)")
    for directory in (root, root / "models", root / "work"):
        if directory is not root and not directory.is_dir():
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise BrvoError(f"model registry {root} is not writable ({directory}: {reason}); retrain publishes "
                            f"versions and records last_retrain.json there: make it writable or pass another "
                            f"registry_dir") from None
    ModelRegistry(root).latest_version()  # a broken 'latest' pointer: one line saying how to repair it
