"""The 'image_quality' step: KID and precision / recall / density / coverage of the synthetic rows
against held-out real ones (tasks.analyses.image_quality measures them)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.analyses.image_quality import HELD_OUT_SPLITS, ImageQualityResult, measure_image_quality
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.export import ExportResult
    from tasks.shared.trained_model import TrainedModel

__all__ = ["HELD_OUT_SPLITS", "IMAGE_QUALITY", "ImageQualityResult", "image_quality_step"]


def image_quality_step(ctx: StepContext, export: ExportResult, pix2pix: TrainedModel) -> ImageQualityResult:
    """The 'image_quality' step."""
    return measure_image_quality(ctx.run_dir, ctx.config, pix2pix.checkpoint_path, log=ctx.log,
                                 augmented_h5=export.augmented_h5)


IMAGE_QUALITY = Step(
    name="image_quality", run=image_quality_step, result_type=ImageQualityResult, needs=("export", "pix2pix"),
    reads=("augmented_h5",), config_fields=("seed", "device"), report="image_quality",
    description="KID and precision/recall/density/coverage of synthetic vs held-out real images, per stage")
