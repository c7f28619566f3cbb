"""The pipeline's one typed config, with presets.

Its fields are the augment flow's parameters, so
``prefect deployment run augment/augment -p image_size=128`` works.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from brvo_models.configs import CRGANConfig, ForecastRecipe, Pix2PixConfig, SegmenterRecipe, UsefulnessConfig
from storage.errors import BrvoError

PresetName = Literal["tiny", "demo", "full"]
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
    max_file_mb: float = Field(64.0, gt=0, description="ingest quarantines a file larger than this (MB) unread")
    max_megapixels: float = Field(64.0, gt=0, description="ingest quarantines an image whose header declares more "
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

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (32, 64, 128, 256, 512 or 1024), got {value}")
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


def preset(name: str) -> PipelineConfig:
    """'tiny' (tests, 32 px, one fixed epoch), 'demo' (CPU, 64 px, minutes, schedules scaled to the data),
    'full' (GPU, 256 px, the reference's fixed schedule of 200 epochs, at batch 8)."""
    if name == "tiny":
        return PipelineConfig(
            preset="tiny",
            image_size=32,
            pix2pix=Pix2PixConfig(ngf=8, ndf=8, n_layers_d=2, epochs=1, batch_size=4, flip_average=True),
            crgan=CRGANConfig(ngf=8, ndf=8, z_dim=8, patient_emb_dim=4, stage_emb_dim=4,
                              context_dim=16, hidden_dim=16, epochs=1, batch_size=4),
            samples_per_missing=2,
            segmenter_steps=10,
            usefulness=UsefulnessConfig(seeds=1, arms=("real_only", "real_plus_synthetic"), low_data_fractions=(),
                                        segmenter=SegmenterRecipe(steps=5, validations=1),
                                        forecaster=ForecastRecipe(width=4, steps=5)),
        )
    if name == "demo":
        return PipelineConfig(
            preset="demo",
            image_size=64,
            # Instance norm, not batch norm: measured on the 53-patient phantom at 64 px, batch-norm
            # runs peak early and decay (val Dice 0.46 -> 0.44), instance norm keeps improving (0.58).
            # lambda_dice: not in the reference pix2pix. At 64 px its L1 objective alone ties Otsu and stays
            # below Frangi (docs/pix2pix-64px.md); a soft-Dice term of the L1's weight, chosen on val
            # patients from 0/10/30/50/100, lifts test Dice 0.566 -> 0.598 (3 seeds). `full` keeps the reference.
            # Checkpoints at most once a minute (and at the end): measured, a demo Pix2Pix checkpoint is 96 MB and
            # takes 0.4-0.6 s to write; CRGAN validates 50 times. The weights trained do not change.
            # Schedules: adaptive, so a dataset smaller than the phantom still gets min_steps optimiser steps
            # and a larger one proportionally more (up to max_steps). On the 53-patient phantom the budget is
            # today's compute: Pix2Pix 16 epochs x 75 steps = 1,200, CRGAN 100 epochs x 5 steps = 500.
            # lambda_dice 1000 and lr 2e-3 (issue 11): chosen on validation patients of four 64 px phantoms (24 and
            # 53 patients, 1-2 and 3-8 images per visit) among the demo, + pixel BCE and a tenth of the GAN weight
            # (docs/robustness-grid.md): mean val Dice 0.854 vs the earlier 100 / 2e-4's 0.832, higher on all four.
            # flip_average (issue 11): chosen on validation patients of nine generators this recipe trained (53 and
            # 24 patients, full and subset models): val Dice higher on all nine, +0.0062 on average.
            pix2pix=Pix2PixConfig(ngf=32, ndf=32, norm="instance", batch_size=8, lambda_dice=1000.0, lr=2e-3,
                                  schedule="adaptive", epochs=16, min_steps=1200, max_steps=4800, val_every=100,
                                  patience=5, checkpoint_every_s=60, flip_average=True),
            crgan=CRGANConfig(ngf=8, ndf=32, n_layers_d=2, z_dim=32, context_dim=128, hidden_dim=128,
                              batch_size=8, lr_g=1e-3, lr_d=4e-4, lambda_adv=0.2, context_subset_prob=0.25,
                              schedule="adaptive", epochs=100, min_steps=500, max_steps=2000, val_every=10,
                              patience=10, checkpoint_every_s=60),
            # The usefulness step inside the demo's 10-minute budget: the product's comparison (real + synthetic
            # vs real alone), both tasks, 3 seeds. synthetic_only and the low-data arms (each trains its own
            # Pix2Pix and CRGAN on a patient subset) run in benchmarks/usefulness_study.py; the report says so.
            usefulness=UsefulnessConfig(arms=("real_only", "real_plus_synthetic"), low_data_fractions=()),
        )
    if name == "full":
        return PipelineConfig(
            preset="full",
            image_size=256,
            # the reference schedule: 200 epochs, 100 at constant lr then 100 of linear decay, no early stop
            # checkpoints at most once a minute: measured, a 256 px checkpoint with its optimiser state (Pix2Pix
            # 686 MB, CRGAN 520 MB) takes 1.0-3.4 s to write, and CRGAN validates every epoch of 3 steps (~0.5 s)
            # Batch 8 at lr 2e-4 x sqrt(8), not the reference's batch 1 at 2e-4: measured on one H200 (53-patient
            # phantom, 5 epochs, seeds 0 and 1, benchmarks/batch_size_check.py, docs/gpu.md), held-out test Dice
            # 0.810 / 0.811 vs batch 1's 0.784 / 0.772 at equal epochs, in about a third of the time.
            pix2pix=Pix2PixConfig(schedule="fixed", epochs=200, decay_fraction=0.5, batch_size=8,
                                  lr=2e-4 * 8 ** 0.5, checkpoint_every_s=60),
            crgan=CRGANConfig(schedule="fixed", epochs=400, batch_size=16, checkpoint_every_s=60),
            # The usefulness step runs the full-data arms only: each low-data arm trains its own Pix2Pix and CRGAN
            # on the reference schedule (about 10 minutes of one H200 per subset, an hour for the default study's 6
            # subsets, projected from docs/gpu.md), far outside the run's budget. benchmarks/usefulness_study.py
            # runs them; the report names what was left out.
            usefulness=UsefulnessConfig(low_data_fractions=()),
        )
    raise BrvoError(f"unknown preset {name!r}; choose tiny, demo or full")


def load_config(preset_name: str = "demo", config_file: str | Path | None = None, **overrides) -> PipelineConfig:
    """Preset, then a JSON config file's fields, then explicit overrides (None = keep)."""
    config = preset(preset_name)
    if config_file is not None:
        path = Path(config_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BrvoError(f"{path}: cannot read config file ({exc}); pass a JSON object of config fields") from None
        if not isinstance(data, dict):
            raise BrvoError(f"{path}: the config file must hold a JSON object of config fields, "
                            f"not a {type(data).__name__}")
        config = config.with_overrides(**flatten_fields(data))
    return config.with_overrides(**overrides)


def flatten_fields(data: dict, prefix: str = "") -> dict:
    """{"crgan": {"epochs": 5}} -> {"crgan.epochs": 5}: the keys ``with_overrides`` takes."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten_fields(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
