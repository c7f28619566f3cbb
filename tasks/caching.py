"""Cache keys from file *contents*, so a rerun of the flow skips finished steps.

Prefect's INPUTS policy hashes a path string, not the file behind it; these keys
hash what the step actually reads (and the config it uses), so a changed input
file re-runs the step and an unchanged one is served from the cache. A step whose
output files were deleted is re-run as well: the flow passes
``refresh_cache=True`` when :func:`outputs_exist` says they are gone.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from storage.hashing import file_sha256


def path_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file; for a directory, of its relative paths, sizes and mtimes (cheap)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    return "missing"


def content_cache_key(
    step: str,
    input_params: Iterable[str] = (),
    derived_inputs: Callable[[dict], Iterable[str | os.PathLike]] | None = None,
) -> Callable[[Any, dict], str]:
    """A Prefect ``cache_key_fn`` over the step name, the contents of ``input_params`` (paths),
    the contents of the files ``derived_inputs(parameters)`` names (e.g. RUN_DIR/soul.h5),
    and every other parameter's JSON (the config included)."""
    input_params = tuple(input_params)

    def key(_context, parameters: dict) -> str:
        h = hashlib.sha256(step.encode())
        for name in sorted(parameters):
            value = parameters[name]
            if callable(value) and not hasattr(value, "model_dump_json"):
                continue  # loggers and callbacks: not inputs, and their repr changes per process
            if name in input_params:
                h.update(f"{name}={path_fingerprint(value)}".encode())
            else:
                h.update(f"{name}={_jsonable(value)}".encode())
        for path in derived_inputs(parameters) if derived_inputs else ():
            h.update(f"{path}={path_fingerprint(path)}".encode())
        return f"{step}-{h.hexdigest()[:32]}"

    return key


def outputs_exist(paths: Iterable[str | os.PathLike]) -> bool:
    return all(Path(p).exists() for p in paths)


def _jsonable(value: Any) -> str:
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if isinstance(value, Path):
        return str(value.resolve())
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except TypeError:
        return repr(value)
