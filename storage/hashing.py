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

import numpy as np


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


#: 16-bit words HDF5 sums before it folds the sums (H5_checksum_fletcher32), so no uint32 overflows
_FLETCHER_BLOCK_WORDS = 360


def hdf5_fletcher32(data: bytes) -> int:
    """The checksum HDF5's Fletcher32 filter appends (little-endian) to a chunk of ``data``.

    HDF5 computes it inside its filter pipeline only; a chunk encoded elsewhere (in a worker
    process, stored with ``write_direct_chunk``) must carry it too. This follows
    ``H5_checksum_fletcher32``: big-endian 16-bit words summed in blocks of 360 with
    end-around-carry folds, an odd last byte as the high half of a word. The tests check it
    against the bytes HDF5 itself stores.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    words = raw[: raw.size - raw.size % 2].view(">u2").astype(np.int64)
    n_blocks = -(-words.size // _FLETCHER_BLOCK_WORDS)
    sizes = np.full(n_blocks, _FLETCHER_BLOCK_WORDS, dtype=np.int64)
    if n_blocks:
        sizes[-1] = words.size - (n_blocks - 1) * _FLETCHER_BLOCK_WORDS
    blocks = np.zeros(n_blocks * _FLETCHER_BLOCK_WORDS, dtype=np.int64)
    blocks[: words.size] = words
    blocks = blocks.reshape(n_blocks, _FLETCHER_BLOCK_WORDS)
    # within a block sum2 gains sum1 after every word: the block's start value of sum1 once per word,
    # plus each word once for every word from it to the block's end (padding zeros add nothing)
    word_sums = blocks.sum(axis=1).tolist()
    weighted = (blocks @ np.arange(_FLETCHER_BLOCK_WORDS, 0, -1, dtype=np.int64)
                - (_FLETCHER_BLOCK_WORDS - sizes) * blocks.sum(axis=1)).tolist()
    sum1 = sum2 = 0
    for size, word_sum, weight in zip(sizes.tolist(), word_sums, weighted):
        sum2 = _fold((sum2 + sum1 * size + weight) & 0xFFFFFFFF)
        sum1 = _fold((sum1 + word_sum) & 0xFFFFFFFF)
    if raw.size % 2:
        sum1 += int(raw[-1]) << 8
        sum2 += sum1
        sum1, sum2 = _fold(sum1), _fold(sum2)
    return (_fold(sum2) << 16) | _fold(sum1)


def _fold(value: int) -> int:
    return (value & 0xFFFF) + (value >> 16)


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
