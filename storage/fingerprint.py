"""Content fingerprint of a SOUL source (directory or manifest CSV), cheap to recompute.

Scheduled retraining must decide quickly whether new visits arrived. The
fingerprint is the sha256 over every input file's relative path, size and content
hash, so a renamed, added, removed or edited image changes it while touching a
file's mtime does not. Content hashes are cached by (path, size, mtime_ns) in a
JSON file, so an unchanged directory is re-fingerprinted from ``stat`` calls
alone. Hidden and OS clutter files (``.DS_Store``, ``Thumbs.db``, ...) and
symlinks that point outside the root, nowhere or into a loop are left out, as
ingest leaves them out; symlinked folders are not walked (their targets inside
the root are walked where they are), so a link loop cannot make the walk endless.
A manifest is read by ingest's own reader (:mod:`storage.manifest`), so the
fingerprint covers exactly the files ingest reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic
from storage.errors import InputDataError
from storage.hashing import file_sha256
from storage.manifest import listed_files

IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "ehthumbs.db"})
CACHE_VERSION = 1


@dataclass(frozen=True)
class SourceFingerprint:
    digest: str
    n_files: int
    total_bytes: int
    hashed: int  # files whose contents were read this time
    reused: int  # files whose hash came from the cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_files(source: str | os.PathLike) -> list[tuple[str, Path | None]]:
    """(name, path) of every file the source consists of, sorted by name; path None when missing.

    A directory: every regular file below it (relative names). A manifest CSV: the CSV
    itself plus each ``image_path``/``label_path`` it lists (relative ones resolved
    against the CSV's folder), whatever its separator or header case.
    """
    source = Path(source)
    if source.is_dir():
        return _dir_files(source)
    if source.is_file():
        return _manifest_files(source)
    raise InputDataError(f"{source}: source not found; pass a SOUL directory or a manifest CSV")


def fingerprint_source(source: str | os.PathLike, cache_path: str | os.PathLike | None = None) -> SourceFingerprint:
    """Fingerprint ``source``; reuse and update the hash cache at ``cache_path`` when given."""
    cache = _load_cache(cache_path)
    new_cache: dict[str, list] = {}
    h = hashlib.sha256()
    n_files = total = hashed = reused = 0
    for name, path in source_files(source):
        if path is None:
            h.update(f"{name}\t-1\tmissing\n".encode())
            continue
        st = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            digest = entry[2]
            reused += 1
        else:
            digest = file_sha256(path)
            hashed += 1
        new_cache[key] = [st.st_size, st.st_mtime_ns, digest]
        h.update(f"{name}\t{st.st_size}\t{digest}\n".encode())
        n_files += 1
        total += st.st_size
    if cache_path is not None and (hashed or new_cache.keys() != cache.keys()):
        write_json_atomic(cache_path, {"version": CACHE_VERSION, "files": new_cache})
    return SourceFingerprint(digest=h.hexdigest(), n_files=n_files, total_bytes=total, hashed=hashed, reused=reused)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _dir_files(root: Path) -> list[tuple[str, Path | None]]:
    """Every regular file below ``root``; a symlink that is not followed (a loop, a folder link, a
    broken link or one pointing outside the root) is listed by name with path None: ingest
    quarantines it, so its presence is part of the source, but what it points at is never read."""
    real_root = root.resolve()
    out: list[tuple[str, Path | None]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        for dname in dirnames:
            if (Path(dirpath) / dname).is_symlink():  # os.walk does not descend into it
                out.append(((Path(dirpath) / dname).relative_to(root).as_posix() + "/", None))
        for fname in filenames:
            if _ignored(fname):
                continue
            path = Path(dirpath) / fname
            name = path.relative_to(root).as_posix()
            if path.is_symlink():  # realpath, unlike Path.resolve, returns (not raises) on a symlink loop
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(real_root) or not target.is_file():
                    out.append((name, None))
                    continue
            elif not path.is_file():
                continue
            out.append((name, path))
    return sorted(out, key=lambda t: t[0])


def _manifest_files(manifest: Path) -> list[tuple[str, Path | None]]:
    """The CSV and every file it lists, read by ingest's own reader (storage.manifest)."""
    out: list[tuple[str, Path | None]] = [(manifest.name, manifest)]
    for value, path in listed_files(manifest):
        out.append((value, path if path.is_file() else None))
    return sorted(out, key=lambda t: t[0])


def _load_cache(cache_path: str | os.PathLike | None) -> dict[str, list]:
    if cache_path is None or not Path(cache_path).exists():
        return {}
    try:
        data = json.loads(Path(cache_path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a re-hash
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]
