"""Fill every patient's missing treatment stages with K CRGAN samples each.

For all patients (every split) and all six stages, a (patient, stage) with no
real image gets ``config.samples_per_missing`` samples, generated from the
patient's observed images; each sample's seed is derived from
(config.seed, patient, stage, sample index) and recorded, so any sample can be
regenerated exactly.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage.paired_format import STAGE_NAMES, read_arrays, read_meta
from storage.run_dir import RunPaths
from storage.work_files import write_work_file
from tasks.config import PipelineConfig
from tasks.engine.logs import run_log
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.shared.trained_model import TrainedModel
    from tasks.preprocess import PreprocessResult


class FillResult(BaseModel):
    synthetic_h5: str
    n_missing_pairs: int
    n_samples: int
    per_stage: dict[int, int]
    seconds: float


def missing_stages(meta: pd.DataFrame) -> dict[str, list[int]]:
    """patient_id -> the stages (0..5) with no real image, for every patient in ``meta``."""
    observed = meta.groupby("patient_id")["stage"].apply(lambda s: set(int(x) for x in s))
    return {pid: [s for s in range(len(STAGE_NAMES)) if s not in stages] for pid, stages in observed.items()}


def sample_seed(base_seed: int, patient_id: str, stage: int, index: int) -> int:
    """A stable 31-bit seed for one sample (independent of processing order)."""
    digest = hashlib.sha256(f"{base_seed}|{patient_id}|{stage}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def fill_missing(run_dir: Path, config: PipelineConfig, crgan_checkpoint: Path, *, log=run_log,
                 soul_h5: str | Path | None = None) -> FillResult:
    """K samples for every missing (patient, stage) of ``soul_h5`` (default RUN_DIR/soul.h5) -> RUN_DIR's
    synthetic.h5."""
    from brvo_models.crgan import load_generator
    from brvo_models.crgan_sampling import generate

    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    soul = Path(soul_h5) if soul_h5 is not None else paths.soul_h5
    meta = read_meta(soul)
    images, _ = read_arrays(soul)
    generator, patient_index, device = load_generator(crgan_checkpoint, config.device, config.image_size)
    k = config.samples_per_missing
    holes = missing_stages(meta)
    split_of = meta.groupby("patient_id")["split"].first().to_dict()
    out_images, rows = [], []
    for pid, stages in holes.items():
        if not stages:
            continue
        mine = meta[meta["patient_id"] == pid]
        context = {int(s): images[np.asarray(rows)] for s, rows in mine.groupby("stage").groups.items()}
        seeds = [[sample_seed(config.seed, pid, s, j) for j in range(k)] for s in stages]
        samples = generate(generator, context, patient_index.get(pid), stages, k, seeds, device)
        for si, stage in enumerate(stages):
            for j in range(k):
                out_images.append(samples[si, j])
                rows.append({"patient_id": pid, "stage": stage, "subset": STAGE_NAMES[stage],
                             "split": split_of[pid], "sample_index": j, "sample_seed": seeds[si][j]})
    table = pd.DataFrame(rows, columns=["patient_id", "stage", "subset", "split", "sample_index", "sample_seed"])
    size = config.image_size
    stacked = np.stack(out_images) if out_images else np.zeros((0, size, size), np.uint8)
    out = write_work_file(paths.synthetic_h5, {"images": stacked}, table,
                          attrs={"crgan_checkpoint": str(crgan_checkpoint), "samples_per_missing": k})
    per_stage = {int(s): int(n) for s, n in table.groupby("stage").size().items()} if len(table) else {}
    n_pairs = sum(len(s) for s in holes.values())
    log(f"fill: {n_pairs} missing (patient, stage) pairs x {k} = {len(table)} synthetic images")
    return FillResult(synthetic_h5=str(out), n_missing_pairs=n_pairs, n_samples=len(table), per_stage=per_stage,
                      seconds=time.perf_counter() - t0)


def fill_step(ctx: StepContext, preprocess: PreprocessResult, crgan: TrainedModel) -> FillResult:
    """The 'fill' step: K CRGAN samples for every missing (patient, stage) of soul.h5."""
    return fill_missing(ctx.run_dir, ctx.config, crgan.checkpoint_path, log=ctx.log, soul_h5=preprocess.path)


FILL = Step(
    name="fill", run=fill_step, result_type=FillResult, needs=("preprocess", "crgan"), reads=("soul_h5",),
    writes=("synthetic_h5",),
    config_fields=("seed", "samples_per_missing", "image_size", "device"),
    description="K CRGAN samples for every missing (patient, stage)")
