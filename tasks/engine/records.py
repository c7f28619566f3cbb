"""RUN_DIR/.steps/<step>.json: what a step's last successful run computed and wrote, and the key it ran under.

A record serves its step only when its key equals this run's (:func:`step_key`: the step's name and
code, its config fields, the input source's content for steps that read it, and every upstream
step's key and output digests) and every output it lists still holds the bytes the step wrote.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from storage.atomic import write_json_atomic
from storage.errors import BrvoError
from storage.hashing import canonical_json
from storage.run_dir import RunPaths
from tasks.engine.identity import FileStamp, code_fingerprint, unchanged
from tasks.engine.step import Step, StepContext

RECORD_VERSION = 1


class StepRecord(BaseModel):
    """RUN_DIR/.steps/<step>.json: what a step's last successful run computed and wrote."""

    version: int = RECORD_VERSION
    step: str
    key: str
    result: dict[str, Any]
    outputs: dict[str, FileStamp]
    seconds: float
    finished_utc: str


def record_path(paths: RunPaths, step: str) -> Path:
    return paths.step_records / f"{step}.json"


def read_record(paths: RunPaths, step: str) -> StepRecord | None:
    path = record_path(paths, step)
    if not path.exists():
        return None
    try:
        record = StepRecord.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError):
        return None  # unreadable or from another record version: the step recomputes
    return record if record.version == RECORD_VERSION else None


def output_key(paths: RunPaths, path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(paths.root.resolve()))
    except ValueError:
        return str(path.resolve())


def resolve_output(paths: RunPaths, key: str) -> Path:
    p = Path(key)
    return p if p.is_absolute() else paths.root / p


def outputs_intact(paths: RunPaths, record: StepRecord) -> bool:
    return all(unchanged(resolve_output(paths, k), v) for k, v in record.outputs.items())


def load_result(step: Step, record: StepRecord) -> BaseModel:
    return step.result_type.model_validate(record.result)


def claim_partial_work(directory: Path, ctx: StepContext) -> None:
    """Let a step resume from partial work in ``directory`` (e.g. checkpoints) only when that work
    was made for this step's current key; otherwise remove it, so a resume can never continue
    training on other data, config or code. Writes ``directory/claimed_by.json``."""

    marker = directory / "claimed_by.json"
    owner = None
    if marker.exists():
        try:
            owner = json.loads(marker.read_text()).get("key")
        except (ValueError, OSError):
            owner = None
    if owner == ctx.key and ctx.key:
        return
    if directory.exists() and any(p.name != marker.name for p in directory.iterdir()):
        ctx.log(f"{directory.name}: the files there were made for other inputs, config or code; starting over")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"key": ctx.key})




def step_key(step: Step, ctx: StepContext, upstream_records: Mapping[str, StepRecord],
             source_digest: str | None = None) -> str:
    """The identity of what ``step`` would compute now (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"step={step.name}\ncode={code_fingerprint(step.run)}\n".encode())
    h.update(f"config={canonical_json(step.config_slice(ctx.config))}\n".encode())
    if step.reads_source:
        h.update(f"source={source_digest}\n".encode())
    for name in step.needs:
        record = upstream_records[name]
        outputs = {k: v.sha256 for k, v in sorted(record.outputs.items())}
        h.update(f"need={name}:{record.key}:{canonical_json(outputs)}\n".encode())
    return h.hexdigest()[:32]


def source_digest(ctx: StepContext) -> str:
    """Content fingerprint of the input source, with hashes cached by (size, mtime) in the run dir."""
    from storage.fingerprint import fingerprint_source

    if ctx.source is None:
        raise BrvoError("this step reads the input source, but no SOUL directory or manifest was given")
    return fingerprint_source(ctx.source, cache_path=ctx.paths.step_records / "source_hashes.json").digest


