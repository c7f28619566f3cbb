"""What a step's result is made of: the code that computes it, and the bytes of the files it wrote.

:func:`code_fingerprint` hashes the sources of a step's module and of every project module it
imports, transitively, so an edit that can change a result changes the step's cache key.
:func:`stamp` / :func:`unchanged` identify outputs by content, checked on every cache hit.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from storage.hashing import file_sha256

#: Packages whose modules count as "the code of a step" when imported by it.
PROJECT_PACKAGES = ("flows", "tasks", "brvo_models", "storage", "deployments")
#: Imported by nearly every step but unable to change a step's result: the config schemas and presets (the
#: values a step uses enter its key through its declared config fields), the step engine (driver, records,
#: logging, Prefect adapter) and the live training progress in the UI. A name covers its submodules. Leaving
#: them out keeps, e.g., a new config field from retraining every model.
RESULT_NEUTRAL_MODULES = frozenset({"tasks.config", "brvo_models.configs", "tasks.engine",
                                    "tasks.shared.progress"})


def is_result_neutral(name: str) -> bool:
    """``name`` or a package above it is in :data:`RESULT_NEUTRAL_MODULES`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in RESULT_NEUTRAL_MODULES for i in range(1, len(parts) + 1))


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


def _runtime_nodes(tree: ast.AST):
    """Every node of a module except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


@lru_cache(maxsize=None)
def _imports_of(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """Project modules a source file imports anywhere in it (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if _is_project(name) and _module_file(name) is not None:
                found.add(name)
    return tuple(sorted(found))


def module_closure(root: str) -> dict[str, Path]:
    """``root`` and every project module it imports, transitively (result-neutral modules left out)."""
    seen: dict[str, Path] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or (name != root and is_result_neutral(name)):
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        stack.extend(_imports_of(path, path.stat().st_mtime_ns))
    return seen


def code_fingerprint(fn: Callable[..., Any]) -> str:
    """sha256 over the sources of ``fn``'s module and every project module it imports.

    A change to any line that can change the step's result (the step, the model it trains,
    the metrics it reports, the format it writes) changes the fingerprint, and so the key.
    """
    fn = inspect.unwrap(fn)
    h = hashlib.sha256()
    for name, path in sorted(module_closure(fn.__module__).items()):
        h.update(f"{name}:{_cached_sha(str(path), *_stat(path))}\n".encode())
    h.update(f"{fn.__module__}.{fn.__qualname__}\n".encode())
    return h.hexdigest()




def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=4096)
def _cached_sha(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a source file, remembered per (path, size, mtime) for the life of the process.
    For code fingerprints only: a step's outputs are hashed afresh (see :func:`unchanged`)."""
    return file_sha256(path)


class FileStamp(BaseModel):
    """A file's (or directory's) identity when its step wrote it."""

    size: int
    mtime_ns: int
    sha256: str


def stamp(path: Path) -> FileStamp:
    """Stamp a file by its bytes, a directory by the names and bytes of the files below it."""
    if path.is_dir():
        h = hashlib.sha256()
        newest = 0
        total = 0
        for p in sorted(path.rglob("*")):
            if p.is_file():
                size, mtime = _stat(p)
                total += size
                newest = max(newest, mtime)
                h.update(f"{p.relative_to(path)}|{size}|{file_sha256(p)}\n".encode())
        return FileStamp(size=total, mtime_ns=newest, sha256=h.hexdigest())
    size, mtime = _stat(path)
    return FileStamp(size=size, mtime_ns=mtime, sha256=file_sha256(path))


def unchanged(path: Path, recorded: FileStamp) -> bool:
    """The output still holds the bytes its step wrote.

    Always by content: a damaged disk block or a copy that keeps the timestamps leaves size and
    mtime as they were, and serving the step would keep the damage forever. Nothing remembers a
    digest by stat (an lru_cache keyed on size and mtime would serve the digest of the bytes as
    first written). A different size needs no hash.
    """
    if not path.exists():
        return False
    if not path.is_dir() and path.stat().st_size != recorded.size:
        return False
    return stamp(path).sha256 == recorded.sha256


