"""Label every synthetic image with Pix2Pix: the binary mask is the label, its mean
per-pixel confidence (max(p, 1 - p) averaged over the image) is kept as a score."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from storage.run_dir import RunPaths
from storage.work_files import read_work_array, write_work_file
from tasks.config import PipelineConfig
from tasks.engine.logs import run_log
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.fill import FillResult
    from tasks.shared.trained_model import TrainedModel


class LabelResult(BaseModel):
    labels_h5: str
    n: int
    mean_vessel_density: float
    mean_confidence: float
    seconds: float


def label_confidence(probabilities: np.ndarray) -> np.ndarray:
    """Per image: mean over pixels of max(p, 1 - p), in [0.5, 1]; 1 = every pixel decided."""
    p = np.asarray(probabilities, np.float32)
    return np.maximum(p, 1.0 - p).reshape(len(p), -1).mean(axis=1)


def label_synthetic(run_dir: Path, config: PipelineConfig, pix2pix_checkpoint: Path, *, log=run_log,
                    synthetic_h5: str | Path | None = None) -> LabelResult:
    """Masks and confidences for the images of ``synthetic_h5`` (default RUN_DIR's) -> RUN_DIR's labels.h5."""
    from brvo_models.pix2pix import label_images, load_labeller

    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    images = read_work_array(Path(synthetic_h5) if synthetic_h5 is not None else paths.synthetic_h5, "images")
    generator, device = load_labeller(pix2pix_checkpoint, config.device, config.image_size)
    probabilities, masks = label_images(generator, images, threshold=config.pix2pix.threshold, device=device)
    confidence = label_confidence(probabilities)
    out = write_work_file(paths.synthetic_labels_h5, {"labels": masks.astype(np.uint8), "label_confidence": confidence},
                          attrs={"pix2pix_checkpoint": str(pix2pix_checkpoint)})
    density = float(masks.mean()) if masks.size else float("nan")
    log(f"label: {len(masks)} synthetic images labelled (vessel density {density:.3f})")
    return LabelResult(labels_h5=str(out), n=len(masks), mean_vessel_density=density,
                       mean_confidence=float(confidence.mean()) if len(confidence) else float("nan"),
                       seconds=time.perf_counter() - t0)


def label_step(ctx: StepContext, fill: FillResult, pix2pix: TrainedModel) -> LabelResult:
    """The 'label' step: Pix2Pix masks and confidences for every synthetic image."""
    return label_synthetic(ctx.run_dir, ctx.config, pix2pix.checkpoint_path, log=ctx.log,
                           synthetic_h5=fill.synthetic_h5)


LABEL = Step(
    name="label", run=label_step, result_type=LabelResult, needs=("fill", "pix2pix"),
    reads=("synthetic_h5",), writes=("synthetic_labels_h5",), config_fields=("pix2pix.threshold", "image_size", "device"),
    description="label every synthetic image with Pix2Pix")
