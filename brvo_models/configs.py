"""Typed model configs. Widths and schedules live here so the same code trains a
small 64 px model on a laptop CPU (preset 'demo') and a paper-size one on a GPU ('full').

Every field carries its range, so a bad value (a zero batch, a negative learning rate, a
probability above 1) is refused when the config is validated, with the field's name, not
deep inside training. Infinity and NaN are refused everywhere (``allow_inf_nan=False``):
Python's json reads them, no range check catches an infinite learning rate, and JSON would
write them back as null.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


#: The widest first conv layer a GAN may have: 4x the reference's 64. A U-Net's parameters grow with its
#: square (Pix2Pix at 256 is about 0.9 G parameters, 14 GB with Adam's state); wider is a typo, not a model.
MAX_WIDTH = 256
#: The longest latent, embedding or recurrent vector of the CRGAN (16x the default hidden_dim).
MAX_VECTOR = 4096


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainingSchedule(_Frozen):
    """How long a model trains, counted in optimiser steps (brvo_models.training.Schedule).

    'fixed' runs exactly ``epochs`` epochs and validates after each (the reference pix2pix
    schedule). 'adaptive' gives a dataset ``epochs`` epochs' worth of optimiser steps clamped
    to [min_steps, max_steps], so a small dataset still gets min_steps, validates every
    ``val_every`` steps and stops once the validation score has not improved for ``patience``
    validations (never before min_steps). Both keep the lr constant, then decay it linearly
    over the final ``decay_fraction`` of the schedule.
    """

    schedule: Literal["fixed", "adaptive"] = Field(
        "fixed", description="'fixed': exactly `epochs` epochs; 'adaptive': a step budget scaled to the dataset, "
        "with early stopping")
    epochs: int = Field(200, ge=1, description="fixed: the number of epochs; adaptive: the step budget is this many "
                                               "epochs' worth of steps, clamped to [min_steps, max_steps]")
    decay_fraction: float = Field(0.5, ge=0.0, le=1.0, description="final fraction of the schedule (epochs when "
                                                                   "fixed, steps when adaptive) with linearly "
                                                                   "decaying lr")
    min_steps: int = Field(1000, ge=1, description="adaptive: the fewest optimiser steps, and no early stop before")
    max_steps: int = Field(100_000, ge=1, description="adaptive: the most optimiser steps")
    val_every: int = Field(500, ge=1, description="adaptive: optimiser steps between validations (and checkpoints)")
    patience: int = Field(0, ge=0, description="adaptive: validations without improvement before training stops; "
                                               "0: never stop early, train the whole budget")
    min_improvement: float = Field(0.0, ge=0.0, description="adaptive: how much a validation score must beat the "
                                                            "best to reset the patience")
    checkpoint_every_s: float = Field(
        0.0, ge=0.0, description="seconds between checkpoint writes (last.pt, and best.pt when improved); 0: at "
        "every validation. Training always ends with both written; a kill loses at most this much training and "
        "the resume replays it exactly. The full preset uses 60: at 256 px a checkpoint is 0.5-0.7 GB")

    @model_validator(mode="after")
    def _steps_in_order(self) -> "TrainingSchedule":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        return self


class Pix2PixConfig(TrainingSchedule):
    """Pix2Pix (Isola et al. 2017) image -> vessel label; defaults follow the reference
    (200 epochs, the first 100 at constant lr, then linear decay)."""

    #: fields that change labelling, not training: left out of the checkpoint's training hash
    inference_only: ClassVar[tuple[str, ...]] = ("threshold",)
    #: fields that change how training runs, not what it trains: also left out of that hash, so a run may
    #: resume with them changed (they stay in the step key: on a GPU they change the rounding)
    execution_only: ClassVar[tuple[str, ...]] = ("cuda_graphs", "checkpoint_every_s")

    ngf: int = Field(64, ge=1, le=MAX_WIDTH, description="generator width of the first layer")
    ndf: int = Field(64, ge=1, le=MAX_WIDTH, description="discriminator width of the first layer")
    n_layers_d: int = Field(3, ge=1, le=8, description="PatchGAN depth; 3 gives the 70x70 receptive field")
    norm: Literal["batch", "instance"] = "batch"
    dropout: bool = True
    lambda_l1: float = Field(100.0, ge=0.0)
    lambda_dice: float = Field(
        0.0, ge=0.0, description="not in the reference: weight of a soft-Dice term on the generator's vessel "
        "probabilities. 0 (the default, and the full preset) keeps the reference objective; the demo preset uses "
        "1000 (docs/pix2pix-64px.md says what it changes at 64 px)")
    lambda_bce: float = Field(
        0.0, ge=0.0, description="not in the reference: weight of a per-pixel binary cross-entropy term on the "
        "generator's vessel probabilities (the supervised segmenter's loss). 0 (the default) leaves it out")
    lambda_gan: float = Field(
        1.0, ge=0.0, description="weight of the generator's adversarial term (the reference's is 1). The "
        "discriminator trains as always; 0 makes the generator a plain supervised U-Net")
    lr: float = Field(2e-4, gt=0.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    batch_size: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast in training and validation: auto = bf16 on CUDA, fp32 on the CPU "
        "(bit-reproducible); fp32 or bf16 on any device (brvo_models.runtime; docs/performance.md)")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="probability above which a pixel is labelled vessel; None (default): "
        "chosen for the best Dice on the validation patients at every validation and stored with the generator "
        "weights")
    augment: bool = Field(True, description="aligned flips and small rotations of (image, label)")
    max_rotation_deg: float = Field(10.0, ge=0.0, le=180.0)
    flip_average: bool = Field(
        False, description="not in the reference: label each image as the mean of the generator's probabilities "
        "over its four flips (brvo_models.flips), at every validation (so best.pt and the threshold are chosen "
        "on averaged labels) and when labelling. Off by default (the reference, and `full`: unmeasured at "
        "256 px); the demo preset turns it on")
    cuda_graphs: bool = Field(
        False, description="CUDA only: compile G and D for training with torch.compile(mode='reduce-overhead') "
        "(CUDA graphs: one launch per graph instead of one per kernel, for batch 1). Measured 1.67x the "
        "training throughput at batch 1 on an H200 (docs/gpu.md); off by default because it is CUDA-only and the "
        "default presets train at batch 8")


class CRGANConfig(TrainingSchedule):
    """Conditional recurrent GAN: patient + stage + noise (+ observed images) -> image per stage."""

    #: fields that change evaluation, not training: left out of the checkpoint's training hash
    inference_only: ClassVar[tuple[str, ...]] = ("eval_samples",)
    #: fields that change how training runs, not what it trains (left out of that hash too)
    execution_only: ClassVar[tuple[str, ...]] = ("checkpoint_every_s",)

    ngf: int = Field(64, ge=1, le=MAX_WIDTH, description="decoder/encoder base width")
    ndf: int = Field(64, ge=1, le=MAX_WIDTH, description="discriminator base width")
    z_dim: int = Field(64, ge=1, le=MAX_VECTOR)
    patient_emb_dim: int = Field(32, ge=1, le=MAX_VECTOR)
    stage_emb_dim: int = Field(16, ge=1, le=MAX_VECTOR)
    context_dim: int = Field(128, ge=1, le=MAX_VECTOR)
    hidden_dim: int = Field(256, ge=1, le=MAX_VECTOR)
    lambda_l1: float = Field(50.0, ge=0.0)
    lambda_adv: float = Field(1.0, ge=0.0)
    lr_g: float = Field(2e-4, gt=0.0)
    lr_d: float = Field(2e-4, gt=0.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast in training and validation: auto = bf16 on CUDA, fp32 on the CPU "
        "(bit-reproducible); fp32 or bf16 on any device (brvo_models.runtime; docs/performance.md)")
    hide_prob: float = Field(0.5, ge=0.0, le=1.0,
                             description="chance of hiding each observed stage from the context in a training step")
    visible_l1_weight: float = Field(0.5, ge=0.0,
                                     description="L1 weight of stages left in the context, relative to hidden ones")
    unknown_patient_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="chance a training sequence uses the 'unknown patient' embedding (how val/test patients are "
                    "served)")
    n_layers_d: int = Field(3, ge=1, le=8,
                            description="PatchGAN depth (capped by image size); 3 gives a 70x70 receptive field")
    texture: bool = Field(True, description="samples get speckle and scan-line noise whose two amplitudes the "
                                          "adversarial loss learns (the zero-noise sample is the estimate)")
    adv_into_estimate: bool = Field(
        False, description="let the adversarial gradient reach the generator's estimate too, not only its texture head")
    lr_texture: float = Field(1e-2, gt=0.0, description="learning rate of the two texture amplitudes (log scale)")
    lambda_density: float = Field(
        0.0, ge=0.0, description="weight of the treatment-effect term: L1 between the soft vessel density of the "
        "estimate and of the stage's mean real image (brvo_models.losses.soft_density at the batch targets' Otsu "
        "threshold), weighted over hidden and visible stages as the L1 term. 0 (default) leaves it out")
    density_target: Literal["level", "change"] = Field(
        "level", description="what the density term compares: 'level', each estimate's density with its stage "
        "mean's; 'change', the density difference between two hidden stages of one sequence with the stage means' "
        "(a bias that every estimate shares, such as blur, cancels)")
    density_softness: float = Field(0.05, gt=0.0, le=1.0,
                                    description="width of the density term's sigmoid, on the [0, 1] intensity scale")
    context_subset_prob: float = Field(
        0.25, ge=0.0, le=1.0, description="chance a visible stage enters the training context as the mean of a random "
                                         "subset of its images (else all of them, as at generation time)")
    repeats: int = Field(1, ge=1, description="passes over the training patients per epoch")
    augment: bool = Field(True, description="random flips, the same for all stages of a sequence")
    eval_samples: int = Field(4, ge=1, description="K random samples per held-out case for the single-sample scores "
                                                   "and the diversity figure (the held-out model score uses the "
                                                   "zero-noise sample)")
    hide_suffix_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="chance a training sequence hides every observed stage after a random cut "
        "(at least the first stays visible) instead of hiding each stage on its own: practises filling after the "
        "last visit. 0 (default): independent hiding only")
    change_weight: float = Field(
        0.0, ge=0.0, description="per-pixel L1 weight 1 + change_weight * d, d the blurred |target - nearest visible "
        "stage| divided by its per-image maximum (at least CHANGE_FLOOR): the pixels that change between stages "
        "weigh more. 0 (default): plain L1")
    val_course_weight: float = Field(
        0.0, ge=0.0, description="validation score = held-out SSIM - this x the mean absolute error (percentage "
        "points) of the estimate's change in the non-perfusion index from the nearest earlier visible stage, on "
        "held-out val stages with an earlier stage. 0 (default): SSIM alone")
    residual_base: Literal["blend", "nearest"] = Field(
        "blend", description="what the decoder's output is a correction of: 'blend', a learned per-pixel mix of "
        "the nearest visible stage before and after the target and the mean of all visible stages; 'nearest', the "
        "nearest visible stage alone (a tie to the earlier), so the decoder predicts the change from it")
    estimate_form: Literal["correction", "gain"] = Field(
        "correction", description="how the decoder turns the reference blend into the estimate: 'correction', a "
        "full-resolution additive correction (inside the Tanh); 'gain', the blend times a smooth gain field the "
        "decoder predicts at 1/8 of the image side (at least 8x8) and upsamples bilinearly: it can carry a "
        "regional change such as reperfusion but cannot fit a scan's pixel noise")
    population_course: bool = Field(
        False, description="move the references (the nearest visible stage before and after the target) to the "
        "target stage with the population course (brvo_models.course_model): a smooth gain learned before "
        "training from every within-patient pair of the training patients' observed stages, so the estimate "
        "starts from the disease's course instead of a copy of the nearest visit")
    course_anchor: bool = Field(
        False, description="with population_course: the estimate's low-pass (regional level) is set to the moved "
        "references' (the two neighbours moved to the target stage, weighted by their distance to it), so the "
        "generator supplies vessels and texture and cannot undo the course; without it the decoder blends in "
        "the unmoved pooled visits and keeps about 40 % of the course its references carry (docs/fill-truth.md)")
    texture_fit: Literal["adversarial", "moments"] = Field(
        "adversarial", description="how the two texture amplitudes are set: 'adversarial', learned by the "
        "discriminator; 'moments', fixed to the spread of the training patients' repeat scans around their "
        "stage mean (stages with 2 or more scans)")


class SegmenterRecipe(_Frozen):
    """How the usefulness protocol trains its segmenter: the project's one supervised segmenter
    (:func:`brvo_models.segmenter.fit_segmenter`: dilated CNN, BCE + soft Dice, best-on-val weights and
    threshold). The same recipe trains every arm (and the relabeller); validation patients, real rows
    only, choose its kept weights and threshold.

    Chosen on the 53-patient demo phantom's validation patients (64 px, real rows, seed 0, one thread):
    arch dilated (8 channels, no norm) at lr 3e-3 stayed at val Dice 0.23 (every pixel a vessel) through
    1,000 steps at batch 8 or 32; dilated_bn (16 channels) on whole images reached 0.708 in 600 steps
    (64 CPU s), on 32 px windows 0.690 in 600 steps (21 CPU s) and 0.680 in 300 (13 CPU s). Chosen by
    budget (the protocol trains one per arm and seed): the best val Dice under about 25 CPU s a fit, so
    32 px windows, 600 steps."""

    arch: Literal["dilated", "dilated_bn", "unet"] = "dilated_bn"
    width: int = Field(16, ge=1, le=256, description="channels of every hidden layer")
    steps: int = Field(600, ge=1, le=1_000_000, description="optimiser steps (batches sampled with replacement)")
    batch_size: int = Field(16, ge=1, le=4096)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast in training and validation: auto = bf16 on CUDA, fp32 on the CPU "
        "(bit-reproducible); fp32 or bf16 on any device (brvo_models.runtime; docs/performance.md)")
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    validations: int = Field(10, ge=1, le=1000, description="validations over the run (the best one is kept)")
    crop: int | None = Field(32, ge=8, description="train on random square windows of this side (fully "
                                                   "convolutional nets; about 4x cheaper a step at 64 px); None = whole")


class ForecastRecipe(_Frozen):
    """The usefulness protocol's treatment-response forecaster (brvo_models.response.ResponseForecaster).

    Chosen on the validation patients of the 53-patient demo phantom (real rows, 2 seeds): val MAE 0.00364
    (width 8, 300 steps, weight decay 1e-4) to 0.00389 over widths 8/16, 300/1000 steps, weight decay
    1e-4/1e-2; then averaging the forecast over the 8 flips/rotations: 0.00355. On the same pairs "no
    change" scores 0.00575 and the train rows' mean change per stage pair 0.00394: the forecaster adds
    the patient-specific part.
    """

    width: int = Field(8, ge=1, le=256, description="channels of the first conv layer (doubling per level, 4 levels)")
    steps: int = Field(300, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    density_scale: float = Field(20.0, gt=0.0, description="densities are regressed in units of 1/scale")
    stage_prior: bool = Field(True, description="start from the training pairs' mean change per stage pair and "
                                                "learn the patient-specific rest (see ResponseForecaster)")
    tta: bool = Field(True, description="average the forecast over the 8 flips/rotations it was trained on")


#: ``synthetic_filter="agreement"`` keeps a synthetic row when its two labels agree at least as well as the
#: independent segmenter agrees with the annotations on this fraction of the real validation rows' worst end
AGREEMENT_QUANTILE = 0.10


class UsefulnessConfig(_Frozen):
    """What the usefulness protocol runs (tasks/usefulness.py): its arms, tasks, seeds, mix and recipes.

    The defaults are the full study (benchmarks/usefulness_study.py); the demo preset runs a reduced one
    to fit its time budget and says so in the report.
    """

    seeds: int = Field(3, ge=1, le=100, description="training seeds per arm; arms are compared paired by seed")
    arms: tuple[Literal["real_only", "real_plus_synthetic", "synthetic_only"], ...] = Field(
        ("real_only", "real_plus_synthetic", "synthetic_only"),
        description="full-data arms, on the run's train patients and its synthetic rows")
    low_data_fractions: tuple[float, ...] = Field(
        (0.25, 0.5), description="low-data arms: this fraction of the train patients, real rows alone vs the "
                                 "same rows + synthetic rows from models trained on that subset only")
    subset_models: Literal["per_seed", "shared"] = Field(
        "per_seed", description="per_seed: each seed draws its own patient subset and trains its own generator "
                                "and labeller on it; shared: seed 0's subset and models serve every seed (cheaper; "
                                "the seeds then vary the downstream training only)")
    tasks: tuple[Literal["segmentation", "response"], ...] = ("segmentation", "response")
    synthetic_filter: Literal["accepted", "all", "agreement"] = Field(
        "accepted", description="which synthetic rows enter a mix: the pipeline's accepted ones, all, or the accepted "
                                "ones whose label agrees with the supervised segmenter's (trained on the arm's real "
                                "rows) at least as well as that segmenter agrees with the annotations on the "
                                f"{AGREEMENT_QUANTILE:.0%}-quantile of the real validation rows "
                                "(tasks.usefulness.select_by_agreement)")
    synthetic_labels: Literal["pipeline", "segmenter"] = Field(
        "pipeline", description="labels of the synthetic rows in a mix: the pipeline's (Pix2Pix), or the supervised "
                                "segmenter's trained on the same real rows as the arm (the subset's in a low-data "
                                "arm), weights and threshold chosen on the validation patients")
    synthetic_weight: float = Field(1.0, gt=0, le=100.0, description="loss weight of a synthetic row (real rows: 1)")
    eval_split: Literal["test", "val"] = Field(
        "test", description="whose real rows score the arms: the held-out test patients (report) or the "
                            "validation patients (for choosing settings)")
    segmenter: SegmenterRecipe = SegmenterRecipe()
    forecaster: ForecastRecipe = ForecastRecipe()

    @model_validator(mode="after")
    def _fractions_in_range(self) -> "UsefulnessConfig":
        bad = [f for f in self.low_data_fractions if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"low_data_fractions must lie in (0, 1), got {bad}")
        return self
