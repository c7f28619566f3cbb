"""Export: RUN_DIR/augmented.h5, the product: real rows and the scored synthetic rows in one format."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage.hashing import file_sha256
from storage.paired_format import STAGE_NAMES, PairedDatasetWriter, meta_frame, validate
from storage.report_schema import SyntheticSection
from storage.run_dir import RunPaths
from storage.work_files import read_work_array, read_work_table
from tasks.config import PipelineConfig
from tasks.shared.trained_model import TrainedModel
from tasks.engine.logs import run_log
from tasks.score import (LABEL_DENSITY, SCORE_NAMES, AcceptanceThresholds, label_density_failures, summarise,
                         threshold_passes)
from tasks.analyses.stage_trend import stage_trend
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.fill import FillResult
    from tasks.ingest import IngestResult
    from tasks.label import LabelResult
    from tasks.preprocess import PreprocessResult
    from tasks.score import ScoreResult

REAL_CHUNK = 256

SOUL_CITATION = ("SOUL (Xue et al., Scientific Data 11:838, 2024, doi:10.1038/s41597-024-03665-7; "
                 "figshare doi:10.6084/m9.figshare.24893358)")


class DataOrigin(BaseModel):
    """What the run's real rows are, so augmented.h5 and its card say whose data it is derived from."""

    kind: Literal["phantom", "soul", "manifest", "unknown"]
    source: str = ""
    #: for the file's `license` attribute
    license: str
    #: the card's licence and attribution paragraph
    attribution: str
    #: what the real rows are, in a few words (the file's `description`)
    rows: str


#: a run without ingest.json, or a file written before augmented.h5 recorded its origin
UNKNOWN_ORIGIN = DataOrigin(kind="unknown", license="not recorded", rows="input rows", attribution=(
    f"What the input was is not recorded. If it is {SOUL_CITATION}, its licence CC BY 4.0 applies and this "
    "derived dataset inherits it: cite the SOUL paper; if it is the built-in phantom, no dataset licence applies."))


def data_origin(run_dir: Path, ingest_json: str | Path | None = None) -> DataOrigin:
    """From ``ingest_json`` (default RUN_DIR/ingest.json): a manifest (the user's own data), or a SOUL tree, which is the built-in
    phantom when its clinical sheet carries the phantom's write stamp
    (:func:`brvo_models.phantom.clinical_sheet.is_phantom_sheet`), else SOUL. A tree without a readable
    sheet is taken for SOUL: its attribution is then owed, never dropped by a guess. No ingest.json: unknown.
    """
    from brvo_models.phantom.clinical_sheet import is_phantom_sheet

    path = Path(ingest_json) if ingest_json is not None else RunPaths.of(run_dir).ingest_json
    if not path.is_file():
        return UNKNOWN_ORIGIN
    ingest = json.loads(path.read_text())
    source = str(ingest.get("source", ""))
    if ingest.get("source_kind") == "manifest":
        return DataOrigin(kind="manifest", source=source, license="that of the input data (set by their owner)",
                          rows="real rows of the user's data", attribution=(
            f"Derived from your own data, listed in the manifest {source}: its licence is the one its owner set, "
            "not brvo-augment's, and this derived dataset inherits it. If the listed images are SOUL's, "
            f"{SOUL_CITATION} licensed CC BY 4.0 applies: cite the SOUL paper."))
    sheet = (ingest.get("clinical") or {}).get("path")
    if sheet and is_phantom_sheet(Path(sheet)):
        return DataOrigin(kind="phantom", source=source, rows="real rows of the built-in phantom",
                          license="none inherited: synthetic data of brvo-augment's built-in phantom",
                          attribution=(
            f"Derived from the built-in phantom ({source}; brvo_models.phantom), not from SOUL: procedural images "
            "and vessel labels of invented patients, synthetic through and through, no patient data. It imitates "
            "SOUL's layout only, so no dataset licence is inherited and no attribution is owed. Recognised by its "
            "clinical sheet's fixed write stamp; its seed and generator version are not recorded in its files."))
    return DataOrigin(kind="soul", source=source, license="CC BY 4.0 (inherited from SOUL, Xue et al. 2024)",
                      rows="real SOUL rows", attribution=(
        f"Derived from {SOUL_CITATION}, licensed CC BY 4.0; this derived dataset inherits CC BY 4.0. Cite the "
        "SOUL paper when you use it."))


def origin_attrs(run_dir: Path, ingest_json: str | Path | None = None) -> dict[str, Any]:
    """augmented.h5's attributes that say what its real rows are and whose licence applies."""
    origin = data_origin(run_dir, ingest_json)
    return {"description": f"brvo-augment augmented paired OCTA dataset: {origin.rows} + CRGAN-filled missing "
                           "stages labelled by Pix2Pix",
            "license": origin.license, "data_origin": origin.model_dump_json()}


class ExportResult(BaseModel):
    augmented_h5: str
    n_real: int
    n_synthetic: int
    n_accepted: int
    size_mb: float
    sha256: str
    synthetic: dict
    seconds: float

    def report_section(self) -> SyntheticSection:
        return SyntheticSection.model_validate(self.synthetic)


class ExportInputs(BaseModel):
    """The files export reads, each from the result of the step that wrote it (None: RUN_DIR's)."""

    soul_h5: str | None = None
    synthetic_h5: str | None = None
    labels_h5: str | None = None
    scores_csv: str | None = None
    ingest_json: str | None = None

    def resolved(self, run_dir: Path) -> dict[str, Path]:
        paths = RunPaths.of(run_dir)
        defaults = {"soul_h5": paths.soul_h5, "synthetic_h5": paths.synthetic_h5,
                    "labels_h5": paths.synthetic_labels_h5, "scores_csv": paths.scores_csv,
                    "ingest_json": paths.ingest_json}
        return {k: Path(v) if v is not None else defaults[k] for k, v in self.model_dump().items()}


def write_augmented(run_dir: Path, config: PipelineConfig, pix2pix: TrainedModel, crgan: TrainedModel,
                    inputs: ExportInputs | None = None) -> Path:
    """Stream soul.h5's real rows, then the scored synthetic rows, into RUN_DIR's augmented.h5 (atomic)."""
    paths = RunPaths.of(run_dir)
    files = (inputs or ExportInputs()).resolved(run_dir)
    table = read_work_table(files["synthetic_h5"])
    scores = pd.read_csv(files["scores_csv"], dtype={"patient_id": str})
    if len(scores) != len(table) or not (scores["patient_id"].to_numpy() == table["patient_id"].to_numpy()).all():
        raise RuntimeError("scores.csv does not match synthetic.h5 row for row; rerun the score step")
    attrs = {
        **origin_attrs(run_dir, files["ingest_json"]),
        "config_json": config.to_json(),
        "source_sha256": file_sha256(files["soul_h5"]),
        "pix2pix_sha256": pix2pix.sha256,
        "crgan_sha256": crgan.sha256,
        "models_origin": json.dumps({m.model: m.origin for m in (pix2pix, crgan)}),
        "samples_per_missing": config.samples_per_missing,
    }
    with h5py.File(files["soul_h5"], "r") as src, PairedDatasetWriter(
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
            images = read_work_array(files["synthetic_h5"], "images")
            labels = read_work_array(files["labels_h5"], "labels")
            rows = pd.DataFrame({
                "patient_id": table["patient_id"], "stage": table["stage"].astype(int), "exam_id": "",
                "subset": table["subset"], "split": table["split"], "is_synthetic": True,
                "label_source": "pix2pix", "sample_index": table["sample_index"],
                "sample_seed": table["sample_seed"], "accepted": scores["accepted"].astype(bool),
                **{k: scores[k].astype(np.float32) for k in SCORE_NAMES},
            })
            out.append(images, labels, rows)
    validate(paths.augmented_h5)
    return paths.augmented_h5


def synthetic_section(meta: pd.DataFrame, thresholds: AcceptanceThresholds, label_density: np.ndarray) -> dict:
    """The report's 'synthetic' section: counts per stage, score summaries, the thresholds (and where they
    came from), how many samples each threshold rejected, and how many labels are degenerate and why
    (tasks.score.label_density_failures; ``label_density``: per synthetic row, in file order)."""
    label_density = np.asarray(label_density, np.float64)
    syn = meta[meta["is_synthetic"]].assign(**{LABEL_DENSITY: label_density})
    why = pd.Series(label_density_failures(label_density, thresholds))
    per_stage = {}
    for stage, name in enumerate(STAGE_NAMES):
        at = meta[meta["stage"] == stage]
        s = at[at["is_synthetic"]]
        per_stage[name] = {"real": int((~at["is_synthetic"]).sum()), "synthetic": int(len(s)),
                           "accepted": int(s["accepted"].sum())}
    return {"n": int(len(syn)), "accepted": int(syn["accepted"].sum()), "per_stage": per_stage,
            "scores": summarise(syn) if len(syn) else {},
            "thresholds": thresholds.model_dump(),
            "rejected_by": {k: int((~v).sum()) for k, v in threshold_passes(syn, thresholds).items()} if len(syn) else {},
            "degenerate_labels": int((why != "").sum()),
            "degenerate_by": {str(k): int(v) for k, v in why[why != ""].value_counts().items()},
            "mean_label_density": float(label_density.mean()) if label_density.size else float("nan")}


def label_densities(path: Path, chunk: int = REAL_CHUNK) -> np.ndarray:
    """Each row's label vessel fraction, read in chunks (a 256 px file need not fit in memory at once)."""
    with h5py.File(path, "r") as f:
        labels = f["labels"]
        blocks = (labels[i:i + chunk] for i in range(0, len(labels), chunk))
        return np.concatenate([b.reshape(len(b), -1).mean(axis=1) for b in blocks] or [np.zeros(0)])


def export(run_dir: Path, config: PipelineConfig, pix2pix: TrainedModel, crgan: TrainedModel,
           thresholds: AcceptanceThresholds, *, log=run_log, inputs: ExportInputs | None = None) -> ExportResult:
    """Write RUN_DIR/augmented.h5 and summarise what is in it."""
    t0 = time.perf_counter()
    out = write_augmented(run_dir, config, pix2pix, crgan, inputs)
    summary = validate(out)
    with h5py.File(out, "r") as f:
        meta = meta_frame(f)
    densities = label_densities(out)  # every row's, read once: the synthetic rows' for the section, all for the trend
    density = densities[meta["is_synthetic"].to_numpy(bool)]
    trend = stage_trend(meta, densities)  # its warnings reach the log with the report's (tasks/rendering/report.py)
    log("export: treatment effect in label density per stage: " + ", ".join(
        f"{name} {'n/a' if trend[key] is None else format(trend[key], '+.4f')}" for name, key in (
            ("real", "real_slope_per_stage"), ("synthetic", "synthetic_slope_per_stage"), ("offset", "synthetic_bias"))))
    n_acc = int(meta.loc[meta["is_synthetic"], "accepted"].sum())
    log(f"export: {out} ({summary.n_real} real + {summary.n_synthetic} synthetic, {n_acc} accepted)")
    return ExportResult(augmented_h5=str(out), n_real=summary.n_real, n_synthetic=summary.n_synthetic,
                        n_accepted=n_acc, size_mb=round(out.stat().st_size / 1e6, 3), sha256=file_sha256(out),
                        synthetic={**synthetic_section(meta, thresholds, density), "stage_trend": trend},
                        seconds=round(time.perf_counter() - t0, 3))


def export_step(ctx: StepContext, ingest: IngestResult, preprocess: PreprocessResult, fill: FillResult,
                label: LabelResult, score: ScoreResult, pix2pix: TrainedModel, crgan: TrainedModel) -> ExportResult:
    """The 'export' step: real rows + scored synthetic rows -> augmented.h5."""
    inputs = ExportInputs(soul_h5=preprocess.path, synthetic_h5=fill.synthetic_h5, labels_h5=label.labels_h5,
                          scores_csv=score.scores_csv, ingest_json=ingest.paths["ingest_json"])
    return export(ctx.run_dir, ctx.config, pix2pix, crgan, score.thresholds, log=ctx.log, inputs=inputs)


EXPORT = Step(
    name="export", run=export_step, result_type=ExportResult, retries=1,
    needs=("ingest", "preprocess", "fill", "label", "score", "pix2pix", "crgan"),
    reads=("ingest_json", "soul_h5", "synthetic_h5", "synthetic_labels_h5", "scores_csv"), writes=("augmented_h5",),
    # the whole config: augmented.h5 carries it as its config_json attribute
    config_fields=tuple(PipelineConfig.model_fields), report="synthetic",
    description="real rows + scored synthetic rows -> augmented.h5")
