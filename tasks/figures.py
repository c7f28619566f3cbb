"""The 'figures' step: the report's pictures (score histograms, training curves, timeline montages)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
from pydantic import BaseModel

from storage.paired_format import read_meta
from storage.report_schema import FiguresSection
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.engine import Step, StepContext
from tasks.rendering.figures import score_histograms, stage_tile, timeline_montage, training_curves
from tasks.score import AcceptanceThresholds

if TYPE_CHECKING:
    from tasks.export import ExportResult
    from tasks.shared.trained_model import TrainedModel

class FiguresResult(BaseModel):
    figures: list[str]
    seconds: float

    def report_section(self) -> FiguresSection:
        return FiguresSection(self.figures)


def write_figures(run_dir: Path, config: PipelineConfig, pix2pix: TrainedModel, crgan: TrainedModel,
                  thresholds: AcceptanceThresholds | None = None, augmented_h5: str | Path | None = None) -> list[Path]:
    """Score histograms (with the run's acceptance thresholds; None: the config's constants), training
    curves and one timeline montage per patient, from ``augmented_h5`` (default RUN_DIR's), into RUN_DIR/figures."""
    paths = RunPaths.of(run_dir)
    augmented = Path(augmented_h5) if augmented_h5 is not None else paths.augmented_h5
    meta = read_meta(augmented)
    t = thresholds or AcceptanceThresholds.from_config(config)
    figures = [
        score_histograms(meta[meta["is_synthetic"]], {
            "consistency_ssim": (t.min_consistency_ssim, None), "realism": (t.min_realism, None),
            "density_z": (-t.max_abs_density_z, t.max_abs_density_z),
            "label_confidence": (t.min_label_confidence, None)},
            paths.figures / "score_histograms.png"),
    ]
    curves = training_curves({m.model: list(m.training.get("history") or []) for m in (pix2pix, crgan)},
                             paths.figures / "training_curves.png")
    if curves is not None:
        figures.append(curves)
    # patients with the most synthetic stages first: the montages report.md shows are the informative ones
    order = meta.groupby("patient_id")["is_synthetic"].sum().sort_values(ascending=False, kind="stable").index
    groups = meta.groupby("patient_id").groups
    with h5py.File(augmented, "r") as f:
        for pid, rows in ((pid, groups[pid]) for pid in order):
            patient = meta.loc[rows]
            tiles = {int(stage): stage_tile(at, f["images"], f["labels"]) for stage, at in patient.groupby("stage")}
            n_syn = int(patient["is_synthetic"].sum())
            n_acc = int((patient["is_synthetic"] & patient["accepted"]).sum())
            title = (f"patient {pid} ({patient['split'].iloc[0]}): {int((~patient['is_synthetic']).sum())} real, "
                     f"{n_syn} synthetic rows ({n_acc} accepted)")
            figures.append(timeline_montage(tiles, title, paths.timeline_figure(pid)))
    return figures


def figures_step(ctx: StepContext, export: ExportResult, pix2pix: TrainedModel, crgan: TrainedModel) -> FiguresResult:
    """The 'figures' step: the report's pictures."""
    t0 = time.perf_counter()
    thresholds = export.synthetic.get("thresholds")
    files = write_figures(ctx.run_dir, ctx.config, pix2pix, crgan,
                          AcceptanceThresholds.model_validate(thresholds) if thresholds else None,
                          augmented_h5=export.augmented_h5)
    ctx.log(f"figures: {len(files)} written to {ctx.paths.figures}")
    return FiguresResult(figures=[str(p) for p in files], seconds=round(time.perf_counter() - t0, 3))


FIGURES = Step(
    name="figures", run=figures_step, result_type=FiguresResult, needs=("export", "pix2pix", "crgan"),
    reads=("augmented_h5",), writes=("figures",), config_fields=("min_consistency_ssim", "min_realism", "max_abs_density_z",
                                        "min_label_confidence"), report="figures",
    description="score histograms, training curves and per-patient timeline montages")
