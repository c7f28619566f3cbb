"""The 'prepare' flow: ingest -> preprocess (SOUL directory -> RUN_DIR/soul.h5)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.config import PipelineConfig
from tasks.ingest import ingest_task
from tasks.preprocess import preprocess_task


@flow(name="prepare", log_prints=True)
def prepare(soul_dir: str, run_dir: str, config_json: str | None = None) -> dict:
    config = PipelineConfig.model_validate_json(config_json) if config_json else PipelineConfig()
    ingested = ingest_task(Path(soul_dir), Path(run_dir))
    prepared = preprocess_task(Path(run_dir), config)
    return {"ingest": _summary(ingested), "preprocess": _summary(prepared)}


def _summary(result) -> dict:
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)
