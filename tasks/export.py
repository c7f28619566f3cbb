"""Export: RUN_DIR/augmented.h5 (real + synthetic rows, one format), DATASET_CARD.md,
report.md/report.json and figures/."""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from storage.atomic import write_text_atomic
from storage.checkpoints import checkpoint_sha256, load_checkpoint
from storage.hashing import file_sha256
from storage.paired_format import STAGE_NAMES, PairedDatasetWriter, meta_frame, validate
from storage.run_dir import RunPaths, read_report, update_report
from storage.work_files import read_work_array, read_work_table
from tasks.caching import content_cache_key
from tasks.config import PipelineConfig
from tasks.figures import score_histograms, timeline_montage, training_curves
from tasks.reporting import run_log
from tasks.report import bar_checks, render_card, render_report
from tasks.score import summarise

REAL_CHUNK = 256


class ExportResult(BaseModel):
    augmented_h5: str
    n_real: int
    n_synthetic: int
    n_accepted: int
    size_mb: float
    sha256: str
    figures: list[str]
    seconds: float


def write_augmented(run_dir: Path, config: PipelineConfig, pix2pix_checkpoint: Path, crgan_checkpoint: Path) -> Path:
    """Stream soul.h5's real rows, then the scored synthetic rows, into augmented.h5 (atomic)."""
    paths = RunPaths.of(run_dir)
    work = paths.synthetic_dir
    table = read_work_table(work / "synthetic.h5")
    scores = pd.read_csv(work / "scores.csv", dtype={"patient_id": str})
    if len(scores) != len(table) or not (scores["patient_id"].to_numpy() == table["patient_id"].to_numpy()).all():
        raise RuntimeError("scores.csv does not match synthetic.h5 row for row; rerun the score step")
    attrs = {
        "description": "brvo-augment augmented paired OCTA dataset: real SOUL rows + CRGAN-filled missing stages "
                       "labelled by Pix2Pix",
        "config_json": config.to_json(),
        "source_sha256": file_sha256(paths.soul_h5),
        "pix2pix_sha256": checkpoint_sha256(pix2pix_checkpoint),
        "crgan_sha256": checkpoint_sha256(crgan_checkpoint),
        "samples_per_missing": config.samples_per_missing,
        "license": "CC BY 4.0 (inherited from SOUL, Xue et al. 2024)",
    }
    with h5py.File(paths.soul_h5, "r") as src, PairedDatasetWriter(
        paths.augmented_h5, config.image_size, compression=config.compression, attrs=attrs
    ) as out:
        real = meta_frame(src)
        for start in range(0, len(real), REAL_CHUNK):
            stop = min(start + REAL_CHUNK, len(real))
            rows = real.iloc[start:stop].copy()
            rows["is_synthetic"] = False
            rows["label_source"] = "annotation"
            out.append(src["images"][start:stop], src["labels"][start:stop], rows)
        if len(table):
            images = read_work_array(work / "synthetic.h5", "images")
            labels = read_work_array(work / "labels.h5", "labels")
            rows = pd.DataFrame({
                "patient_id": table["patient_id"], "stage": table["stage"].astype(int), "exam_id": "",
                "subset": table["subset"], "split": table["split"], "is_synthetic": True,
                "label_source": "pix2pix", "sample_index": table["sample_index"],
                "sample_seed": table["sample_seed"], "accepted": scores["accepted"].astype(bool),
                **{k: scores[k].astype(np.float32) for k in ("consistency_ssim", "realism", "density_z",
                                                             "label_confidence")},
            })
            out.append(images, labels, rows)
    validate(paths.augmented_h5)
    return paths.augmented_h5


def synthetic_section(meta: pd.DataFrame) -> dict:
    syn = meta[meta["is_synthetic"]]
    per_stage = {}
    for stage, name in enumerate(STAGE_NAMES):
        at = meta[meta["stage"] == stage]
        s = at[at["is_synthetic"]]
        per_stage[name] = {"real": int((~at["is_synthetic"]).sum()), "synthetic": int(len(s)),
                           "accepted": int(s["accepted"].sum())}
    return {"n": int(len(syn)), "accepted": int(syn["accepted"].sum()), "per_stage": per_stage,
            "scores": summarise(syn) if len(syn) else {}}


def _history(checkpoint: Path) -> list[dict]:
    last = checkpoint.parent / "last.pt"
    try:
        return list(load_checkpoint(last if last.exists() else checkpoint).get("history", []))
    except Exception as exc:  # a missing history must not block the dataset; say so in the figure
        run_log(f"export: no training history in {checkpoint.parent} ({exc})")
        return []


def write_figures(run_dir: Path, config: PipelineConfig, meta: pd.DataFrame, pix2pix_checkpoint: Path,
                  crgan_checkpoint: Path) -> list[Path]:
    paths = RunPaths.of(run_dir)
    figures = [
        score_histograms(meta[meta["is_synthetic"]], {
            "consistency_ssim": (config.min_consistency_ssim, None), "realism": (config.min_realism, None),
            "density_z": (-config.max_abs_density_z, config.max_abs_density_z),
            "label_confidence": (config.min_label_confidence, None)},
            paths.figures / "score_histograms.png"),
        training_curves({"pix2pix": _history(pix2pix_checkpoint), "crgan": _history(crgan_checkpoint)},
                        paths.figures / "training_curves.png"),
    ]
    with h5py.File(paths.augmented_h5, "r") as f:
        for pid, rows in meta.groupby("patient_id").groups.items():
            entries = {}
            for stage, at in meta.loc[rows].groupby("stage"):
                real = at[~at["is_synthetic"]]
                pick = real if len(real) else at.sort_values("sample_index")
                row = int(pick.index[0])
                entries[int(stage)] = (f["images"][row], f["labels"][row], bool(pick["is_synthetic"].iloc[0]))
            split = meta.loc[rows, "split"].iloc[0]
            figures.append(timeline_montage(entries, f"patient {pid} ({split})", paths.timeline_figure(pid)))
    return figures


def export(run_dir: Path, config: PipelineConfig, pix2pix_checkpoint: Path, crgan_checkpoint: Path,
           data_source: str = "", *, log=run_log) -> ExportResult:
    t0 = time.perf_counter()
    out = write_augmented(run_dir, config, pix2pix_checkpoint, crgan_checkpoint)
    summary = validate(out)
    with h5py.File(out, "r") as f:
        meta = meta_frame(f)
    from tasks.run_record import versions

    update_report(run_dir, "synthetic", synthetic_section(meta))
    update_report(run_dir, "config", {"preset": config.preset, **config.model_dump(mode="json")})
    update_report(run_dir, "versions", versions())
    figures = write_figures(run_dir, config, meta, pix2pix_checkpoint, crgan_checkpoint)
    refresh_documents(run_dir, data_source)
    sha = file_sha256(out)
    n_acc = int(meta.loc[meta["is_synthetic"], "accepted"].sum())
    log(f"export: {out} ({summary.n_real} real + {summary.n_synthetic} synthetic, {n_acc} accepted)")
    return ExportResult(augmented_h5=str(out), n_real=summary.n_real, n_synthetic=summary.n_synthetic,
                        n_accepted=n_acc, size_mb=out.stat().st_size / 1e6, sha256=sha,
                        figures=[str(p) for p in figures], seconds=time.perf_counter() - t0)


def refresh_documents(run_dir: Path, data_source: str) -> None:
    """(Re)write report.md and DATASET_CARD.md from report.json and augmented.h5's attributes."""
    paths = RunPaths.of(run_dir)
    report = read_report(run_dir)
    bars = bar_checks(report)
    if bars:
        update_report(run_dir, "bars", bars)
        report["bars"] = bars
    attrs = validate(paths.augmented_h5).attrs
    write_text_atomic(paths.report_md, render_report(report, data_source))
    write_text_atomic(paths.dataset_card, render_card(report, attrs, data_source))


export_task = task(
    name="export",
    retries=1,
    cache_key_fn=content_cache_key("export", ["pix2pix_checkpoint", "crgan_checkpoint"], lambda p: [
        RunPaths.of(p["run_dir"]).soul_h5, RunPaths.of(p["run_dir"]).synthetic_dir / "scores.csv"]),
    persist_result=True,
)(export)
