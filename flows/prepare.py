"""The 'prepare' flow: ingest -> preprocess, on a SOUL directory or manifest CSV."""
from __future__ import annotations

from prefect import flow

from flows.run_steps import run_steps
from tasks.config import config_from
from tasks.engine import Step
from tasks.ingest import INGEST
from tasks.preprocess import PREPROCESS

PREPARE: tuple[Step, ...] = (INGEST, PREPROCESS)


@flow(name="prepare", log_prints=True)
def prepare(soul_dir: str, run_dir: str, preset: str = "demo", config_json: str | None = None) -> dict:
    """SOUL directory (or manifest CSV) -> RUN_DIR/manifest.csv, quarantine.csv, soul.h5; the config is the
    preset with ``config_json`` (any of its fields) on top."""
    config = config_from(preset, config_json)
    run = run_steps(PREPARE, run_dir, config, source=soul_dir)
    return {name: result.model_dump(mode="json") for name, result in run.results.items()}
