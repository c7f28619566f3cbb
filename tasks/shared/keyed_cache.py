"""One JSON entry per cache key: read it back only when it holds the key asked for, write it atomically.

Why a module: parts of a step that depend on less than the step (the label baselines, the usefulness
protocol's real-only results) are kept by keys of their own under RUN_DIR/cache/, and each must treat a
damaged or foreign entry the same way: never serve it, say so, compute again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic
from tasks.engine.logs import LogFn


def read_entry(path: Path, key: str, log: LogFn, what: str) -> dict[str, Any] | None:
    """The entry at ``path`` ({'key', 'computed_utc', 'result'}) when it holds ``key``; None when there is none,
    it holds another key, or it cannot be read (logged as '``what``: ignoring unreadable cache entry ...')."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log(f"{what}: ignoring unreadable cache entry {path.name} ({type(exc).__name__}); computing")
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key and "result" in entry else None


def write_entry(path: Path, key: str, result: Any) -> None:
    """Keep ``result`` (JSON-serialisable) under ``key`` at ``path``, atomically, with the time it was computed."""
    write_json_atomic(path, {"key": key, "computed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "result": result})
