"""RUN_DIR/run.json: the config, package versions and file hashes of a run.

Steps record the config they ran with, so later subcommands on the same run
directory reuse it instead of silently switching presets.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


from storage.atomic import write_json_atomic
from storage.errors import BrvoError
from storage.paired_format import code_version
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig, parse_config


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"brvo_augment": code_version(), "python": platform.python_version()}
    for pkg in ("torch", "prefect", "h5py", "numpy", "scikit-image", "pandas", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = RunPaths.of(run_dir).run_json
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def recorded_config(run_dir: str | os.PathLike) -> PipelineConfig | None:
    record = read_run_record(run_dir)
    if "config" not in record:
        return None
    try:
        return parse_config(record["config"])
    except BrvoError as exc:  # e.g. a run directory written by an older version, whose fields changed
        raise BrvoError(f"{RunPaths.of(run_dir).run_json}: the recorded config does not validate with this version "
                        f"({exc}); pass --preset/--config, or use a fresh run directory") from None


def record_run(run_dir: str | os.PathLike, config: PipelineConfig, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` (e.g. hashes={'soul.h5': sha}) into run.json with the config and versions."""
    record = read_run_record(run_dir)
    record["config"] = json.loads(config.to_json())
    record["versions"] = versions()
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key] = {**record[key], **value}
        else:
            record[key] = value
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(RunPaths.of(run_dir).run_json, record)
    return record
