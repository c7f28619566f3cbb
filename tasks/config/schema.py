"""The pipeline's one typed config: every setting of a run, checked when it is made."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from brvo_models.configs import CRGANConfig, Pix2PixConfig, UsefulnessConfig
from storage.errors import BrvoError

PresetName = Literal["tiny", "demo", "full"]
#: ingest's bounds on a file before it is decoded (the config's defaults, and ingest's when called without one)
DEFAULT_MAX_FILE_MB = 64.0
DEFAULT_MAX_MEGAPIXELS = 64.0
LabelResize = Literal["nearest", "max", "area"]


class InputSanityConfig(BaseModel):
    """Ingest's bounds on a usable pair; a pair outside them goes to quarantine.csv with the bound it broke.

    Each bound sits far outside what real data does, so it only catches inputs that would silently
    train on nothing or on distortion. SOUL: 304x304 px, square, grey levels spanning 200+, label
    vessel density about 0.05-0.4; the built-in phantom, at any of its settings: 32-2048 px, square,
    density 0.02-0.46.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_image_side: int = Field(
        16, ge=1, le=4096, description="shortest side in px: a smaller image holds no vessel structure to learn and "
        "is upscaled to image_size (at least 32) from a handful of pixels")
    max_aspect_ratio: float = Field(
        2.0, ge=1.0, allow_inf_nan=False, description="longer side / shorter side: preprocess resizes every "
        "image to a square, so a 10000x10 scan would be squashed into stripes; 2 still admits 4:3 and 3:2 frames")
    min_grey_range: int = Field(
        8, ge=0, le=255, description="max - min grey level (8-bit scale): below it the image is constant (a blank "
        "frame, a failed export); JPEG noise on a flat frame moves a few levels, a real scan spans hundreds")
    min_label_density: float = Field(
        0.001, ge=0.0, lt=0.5, allow_inf_nan=False, description="share of label pixels above 127 (vessel): "
        "below 0.1 % the annotation is empty or a few stray dots (SOUL's sparsest is about 5 %, the phantom's 2 %)")
    max_label_density: float = Field(
        0.7, gt=0.5, le=1.0, allow_inf_nan=False, description="share of label pixels above 127: above 70 % the "
        "mask is all-vessel or inverted (vessels black); SOUL's densest is about 40 %, the phantom's 46 %")


class PipelineConfig(BaseModel):
    """Every setting of a run. Ranges are checked when the config is made, before any work starts; Infinity
    and NaN are refused in every number (a range check lets an infinite bound through)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    preset: PresetName = "demo"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    image_size: int = Field(64, ge=32, le=1024,
                            description="side of the square images in soul.h5: a power of two, 32 to 1024")
    label_resize: LabelResize = Field(
        "nearest", description="how preprocess resizes the annotation to image_size: 'nearest' (one annotated pixel "
        "per output pixel: vessel density unbiased, thin vessels become broken dots), 'max' (vessel where any "
        "annotated vessel pixel falls in the output pixel: thin vessels stay connected, density grows), 'area' "
        "(vessel where vessels cover at least half of it: thin vessels vanish)")
    compression: Literal["gzip-1", "gzip-4", "lzf"] = Field(
        "gzip-1", description="HDF5 compression: gzip-1 (default, portable), gzip-4, lzf")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of patients held out for validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of patients held out for testing")
    workers: int = Field(2, ge=1, le=64, description="processes for JPEG decoding in preprocess")
    max_file_mb: float = Field(DEFAULT_MAX_FILE_MB, gt=0,
                               description="ingest quarantines a file larger than this (MB) unread")
    max_megapixels: float = Field(DEFAULT_MAX_MEGAPIXELS, gt=0,
                                  description="ingest quarantines an image whose header declares more "
                                              "pixels than this (millions), before decoding it")
    input_sanity: InputSanityConfig = Field(InputSanityConfig(), description="ingest's bounds on image size, "
                                            "aspect ratio, grey range and label density (quarantined outside them)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    concurrent_steps: Literal["auto", "on", "off"] = Field(
        "auto", description="run steps that need nothing from each other (the two trainings) at once, a process "
        "each: 'auto' on CUDA only (CPU runs stay sequential and bit-reproducible), 'on', 'off'")
    pix2pix: Pix2PixConfig = Pix2PixConfig()
    crgan: CRGANConfig = CRGANConfig()
    samples_per_missing: int = Field(4, ge=1, le=256, description="K synthetic images per missing (patient, stage)")
    acceptance: Literal["calibrated", "fixed"] = Field(
        "calibrated", description="where the acceptance thresholds come from. 'calibrated': consistency_ssim, "
        "density_z and label_confidence bounds from the same scores of held-out real rows (the validation "
        "patients' real images), so each bound alone rejects `acceptance_quantile` of them; realism keeps "
        "min_realism (tasks/score.py says why). 'fixed': the four constants below")
    acceptance_quantile: float = Field(
        0.05, gt=0.0, lt=0.5, description="calibrated acceptance: the share of held-out real rows each calibrated "
        "bound would reject")
    min_consistency_ssim: float = Field(0.2, ge=-1.0, le=1.0, description="fixed acceptance only")
    min_realism: float = Field(0.05, ge=0.0, le=1.0, description="both acceptance modes")
    max_abs_density_z: float = Field(3.0, gt=0.0, description="fixed acceptance only")
    min_label_confidence: float = Field(0.6, ge=0.5, le=1.0, description="fixed acceptance only")
    segmenter_steps: int = Field(
        2000, ge=1, le=1_000_000, description="optimiser steps of the supervised-segmenter label baseline (a small "
        "dilated CNN, BCE + soft Dice, trained on Pix2Pix's train rows; weights and threshold chosen on validation "
        "patients). 2000 at lr 3e-3: val Dice 0.69 on two 64 px phantoms, about 0.01 below 6000 steps' "
        "(brvo_models/segmenter.py)")
    usefulness: UsefulnessConfig = Field(UsefulnessConfig(), description="the usefulness protocol's arms, tasks, "
                                         "seeds, mix and downstream recipes (tasks/usefulness.py)")
    labelled_train_patients: tuple[str, ...] | None = Field(
        None, description="the train patients whose annotations may be used (a clinic with many scans and few "
        "annotated): Pix2Pix and its label baselines train on their rows only, the other train patients' images "
        "stay unlabelled and CRGAN still trains on every train image. None (default): every train patient is "
        "labelled")

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (32, 64, 128, 256, 512 or 1024), got {value}")
        return value

    @field_validator("labelled_train_patients")
    @classmethod
    def _some_patient_labelled(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("names no patient; leave it out (None) when every train patient is labelled")
        return value

    @model_validator(mode="after")
    def _splits_leave_training_patients(self) -> "PipelineConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {self.val_fraction} + "
                             f"{self.test_fraction}); the rest of the patients train the models")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def with_overrides(self, **overrides) -> "PipelineConfig":
        data = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            *sections, name = key.split(".")
            node = data
            for i, head in enumerate(sections):
                if not isinstance(node.get(head), dict):
                    raise BrvoError(f"config: unknown section {'.'.join(sections[:i + 1])!r} in {key!r}; sections "
                                    "are input_sanity, pix2pix, crgan, usefulness, usefulness.segmenter and "
                                    "usefulness.forecaster")
                node[head] = dict(node[head])
                node = node[head]
            node[name] = value
        return parse_config(data)


def parse_config(data: dict | str) -> PipelineConfig:
    """A whole config from a dict or its JSON text; any problem is one BrvoError line naming the fields."""
    try:
        if isinstance(data, str):
            return PipelineConfig.model_validate_json(data)
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise BrvoError(f"config: {'; '.join(_problem(e) for e in exc.errors())}") from None


def _problem(error: dict) -> str:
    """One validation error as 'field: what is wrong'; a non-finite number also says which value it got."""
    field = ".".join(str(x) for x in error["loc"]) or "config"
    if error["type"] == "finite_number":
        return f"{field} must be a finite number, got {error['input']}"
    return f"{field}: {error['msg']}"


def flatten_fields(data: dict, prefix: str = "") -> dict:
    """{"crgan": {"epochs": 5}} -> {"crgan.epochs": 5}: the keys ``with_overrides`` takes."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten_fields(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
