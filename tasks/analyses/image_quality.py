"""Are the synthetic images, as a set, like held-out real ones? (the 'image_quality' step's measure)

The per-sample ``realism`` score is the CRGAN's own discriminator judging its own samples. This
step gives the distribution-level numbers GAN users expect (brvo_models/image_quality.py: KID and
precision / recall / density / coverage), per stage and pooled, between

- the synthetic rows the dataset offers as usable (the accepted ones; all of them when none was
  accepted, and the section says so), and
- the real rows of the held-out patients (val and test), which neither model trained on,

with two feature extractors that need no download: a fixed seeded random CNN (texture and
sharpness) and the encoder of this run's Pix2Pix generator (what the labeller looks at),
calibrated on the real training images. The same numbers for the real *training* images in place
of the synthetic ones are the ceiling ("baseline"): images of other real patients are what a
perfect generator of new patients would match, and they score well below two halves of one pool.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from storage.paired_format import read_arrays, read_meta
from storage.report_schema import ImageQualitySection
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.engine.logs import run_log

#: Held-out real rows: patients neither model trained on.
HELD_OUT_SPLITS = ("val", "test")
#: The numbers the report shows, with their direction.
SHOWN = {"kid_mean": "lower is better", "precision": "fidelity, higher is better",
         "recall": "diversity, higher is better", "density": "fidelity, about 1 for one distribution",
         "coverage": "diversity, higher is better"}


class ImageQualityResult(BaseModel):
    """Per feature extractor, per stage (and "all"): synthetic vs held-out real, with the real-training ceiling."""

    synthetic_rows: str  # "accepted" or "all (none accepted)"
    n_synthetic: int
    n_held_out_real: int
    n_train_real: int
    extractors: dict[str, dict[str, dict[str, Any]]]
    seconds: float

    def report_section(self) -> ImageQualitySection:
        return ImageQualitySection.model_validate(self.model_dump())


def measure_image_quality(run_dir: Path, config: PipelineConfig, pix2pix_checkpoint: Path, *,
                          log=run_log, augmented_h5: str | Path | None = None) -> ImageQualityResult:
    """KID and prdc per stage for the random-CNN and the Pix2Pix-encoder features (module docstring)."""
    from brvo_models.image_quality import RandomCNNFeatures, stage_quality, unet_encoder_features
    from brvo_models.pix2pix import load_labeller

    t0 = time.perf_counter()
    h5 = Path(augmented_h5) if augmented_h5 is not None else RunPaths.of(run_dir).augmented_h5
    meta = read_meta(h5)
    real = ~meta["is_synthetic"]
    synthetic = meta["is_synthetic"] & meta["accepted"]
    which = "accepted"
    if not synthetic.any():
        synthetic, which = meta["is_synthetic"], "all (none accepted)"
    held_out = real & meta["split"].isin(HELD_OUT_SPLITS)
    train = real & (meta["split"] == "train")

    def images(mask) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(mask.to_numpy())
        return read_arrays(h5, rows)[0], meta["stage"].to_numpy()[rows]

    (syn_x, syn_s), (real_x, real_s), (train_x, train_s) = images(synthetic), images(held_out), images(train)
    generator, device = load_labeller(pix2pix_checkpoint, config.device, config.image_size)
    extractors = {"random_cnn": RandomCNNFeatures(seed=config.seed).to(device),
                  "pix2pix_encoder": unet_encoder_features(generator).calibrate(train_x)}
    results = {name: stage_quality(syn_x, syn_s, real_x, real_s, extractor=extractor,
                                   baseline_images=train_x, baseline_stages=train_s)
               for name, extractor in extractors.items()}
    pooled = results["random_cnn"]["all"]
    log(f"image_quality: {len(syn_x)} {which} synthetic vs {len(real_x)} held-out real images (random CNN, "
        f"all stages): KID {pooled['kid_mean']:.4f} (real training images: {pooled['baseline']['kid_mean']:.4f}), "
        f"precision {pooled['precision']:.3f}, recall {pooled['recall']:.3f}")
    return ImageQualityResult(synthetic_rows=which, n_synthetic=len(syn_x), n_held_out_real=len(real_x),
                              n_train_real=len(train_x), extractors=results,
                              seconds=round(time.perf_counter() - t0, 3))
