"""The presets (tiny, demo, full) and how a run's config is made: a preset, then a partial overlay."""
from __future__ import annotations

import json
from pathlib import Path

from brvo_models.configs import CRGANConfig, ForecastRecipe, Pix2PixConfig, SegmenterRecipe, UsefulnessConfig
from brvo_models.hardware import cpu_has_native_bf16
from storage.errors import BrvoError
from tasks.config.schema import PipelineConfig, flatten_fields


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
        # bf16 autocast where the CPU has bf16 instructions (on CUDA 'auto' is bf16 already): it met the margins
        # of docs/performance.md's rule on Pix2Pix, CRGAN and the usefulness segmenter and trains them 1.2-1.5x
        # faster; without those instructions bf16 is emulated and slower, so 'auto' (fp32 on the CPU) stays.
        precision = "bf16" if cpu_has_native_bf16() else "auto"
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
            # lambda_dice 1000 and lr 2e-3: chosen on validation patients of four 64 px phantoms (24 and
            # 53 patients, 1-2 and 3-8 images per visit) among the demo, + pixel BCE and a tenth of the GAN weight
            # (docs/robustness-grid.md): mean val Dice 0.854 vs the earlier 100 / 2e-4's 0.832, higher on all four.
            # flip_average: chosen on validation patients of nine generators this recipe trained (53 and
            # 24 patients, full and subset models): val Dice higher on all nine, +0.0062 on average.
            pix2pix=Pix2PixConfig(ngf=32, ndf=32, norm="instance", batch_size=8, lambda_dice=1000.0, lr=2e-3,
                                  schedule="adaptive", epochs=16, min_steps=1200, max_steps=4800, val_every=100,
                                  patience=5, checkpoint_every_s=60, flip_average=True,
                                  precision=precision),
            # population_course: kept by the rule of docs/fill-truth.md (round 2): on four phantoms never used to
            # choose it, two seeds each, it carried 33 points more of the course after the last visit (t = 3.6)
            # at a gap closed not shown worse (-1.2 points, t = -1.95) and the same val SSIM.
            crgan=CRGANConfig(ngf=8, ndf=32, n_layers_d=2, z_dim=32, context_dim=128, hidden_dim=128,
                              batch_size=8, lr_g=1e-3, lr_d=4e-4, lambda_adv=0.2, context_subset_prob=0.25,
                              schedule="adaptive", epochs=100, min_steps=500, max_steps=2000, val_every=10,
                              patience=10, checkpoint_every_s=60, population_course=True,
                              precision=precision),
            # The usefulness step inside the demo's 10-minute budget: the product's comparison (real + synthetic
            # vs real alone), both tasks, 3 seeds. synthetic_only and the low-data arms (each trains its own
            # Pix2Pix and CRGAN on a patient subset) run in benchmarks/usefulness_study.py; the report says so.
            usefulness=UsefulnessConfig(arms=("real_only", "real_plus_synthetic"), low_data_fractions=(),
                                        segmenter=SegmenterRecipe(precision=precision)),
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


def config_from(preset_name: str = "demo", overlay: dict | str | None = None, **overrides) -> PipelineConfig:
    """The one way a run's config is made: a preset, then ``overlay`` (any of its fields, nested or dotted, as
    a dict or JSON object text: a partial config, or a whole one), then explicit overrides (None = keep).

    Every entry point uses it: the CLI (--preset, --config FILE), and the augment, retrain and prepare flows
    (``preset``, ``config_json``)."""
    config = preset(preset_name)
    if isinstance(overlay, str):
        try:
            overlay = json.loads(overlay)
        except json.JSONDecodeError as exc:
            raise BrvoError(f"config_json is not valid JSON ({exc}); pass a JSON object of config fields") from None
        if not isinstance(overlay, dict):
            raise BrvoError("config_json must be a JSON object of config fields")
    if overlay:
        config = config.with_overrides(**flatten_fields(overlay))
    return config.with_overrides(**overrides)


def load_config(preset_name: str = "demo", config_file: str | Path | None = None, **overrides) -> PipelineConfig:
    """Preset, then a JSON config file's fields, then explicit overrides (None = keep): :func:`config_from`
    with the overlay read from a file."""
    data = None
    if config_file is not None:
        path = Path(config_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BrvoError(f"{path}: cannot read config file ({exc}); pass a JSON object of config fields") from None
        if not isinstance(data, dict):
            raise BrvoError(f"{path}: the config file must hold a JSON object of config fields, "
                            f"not a {type(data).__name__}")
    return config_from(preset_name, data, **overrides)
