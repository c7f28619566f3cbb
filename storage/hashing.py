"""Content hashes: of files, of JSON-able values, and fsync of a directory entry.

One module for every digest the project records (checkpoint sidecars, soul.h5 and
augmented.h5 provenance, the registry, source fingerprints, cache keys, config
hashes). It imports no torch, so cheap paths (a scheduled retrain that finds no
change, a cache lookup) stay cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text.

    A pydantic model is dumped first (``model_dump(mode='json')``); a string is taken as
    JSON text and re-encoded canonically, so the same config hashes the same whether it
    arrives as an object or as its JSON.
    """
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, str):
        value = json.loads(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def json_sha256(value: Any, length: int = 16) -> str:
    """Short stable hash of a JSON-able value, a pydantic model or JSON text (see :func:`canonical_json`)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(Path(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
