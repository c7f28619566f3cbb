"""Typed model configs. Widths and schedules live here so the same code trains a
small 64 px model on a laptop CPU (preset 'demo') and a paper-size one on a GPU ('full').
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pix2PixConfig(_Frozen):
    """Pix2Pix (Isola et al. 2017) image -> vessel label; defaults follow the reference."""

    #: fields that change labelling, not training: left out of the checkpoint's training hash
    inference_only: ClassVar[tuple[str, ...]] = ("threshold",)

    ngf: int = Field(64, description="generator width of the first layer")
    ndf: int = Field(64, description="discriminator width of the first layer")
    n_layers_d: int = Field(3, description="PatchGAN depth; 3 gives the 70x70 receptive field")
    norm: Literal["batch", "instance"] = "batch"
    dropout: bool = True
    lambda_l1: float = 100.0
    lambda_dice: float = Field(
        0.0, ge=0.0, description="not in the reference: weight of a soft-Dice term on the generator's vessel "
        "probabilities. 0 (the default, and the full preset) keeps the reference objective; the demo preset uses "
        "100 (docs/pix2pix-64px.md says what it changes at 64 px)")
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 1
    epochs: int = Field(200, description="total epochs: the first half at constant lr, then linear decay")
    epochs_decay: int | None = Field(None, description="epochs of linear decay at the end (default: half of epochs)")
    threshold: float | None = Field(
        None, description="probability above which a pixel is labelled vessel; None (default): chosen for the best "
        "Dice on the validation patients at every epoch and stored with the generator weights")
    augment: bool = Field(True, description="aligned flips and small rotations of (image, label)")
    max_rotation_deg: float = 10.0


class CRGANConfig(_Frozen):
    """Conditional recurrent GAN: patient + stage + noise (+ observed images) -> image per stage."""

    #: fields that change evaluation, not training: left out of the checkpoint's training hash
    inference_only: ClassVar[tuple[str, ...]] = ("eval_samples",)

    ngf: int = Field(64, description="decoder/encoder base width")
    ndf: int = Field(64, description="discriminator base width")
    z_dim: int = 64
    patient_emb_dim: int = 32
    stage_emb_dim: int = 16
    context_dim: int = 128
    hidden_dim: int = 256
    lambda_l1: float = 50.0
    lambda_adv: float = 1.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 8
    epochs: int = 200
    hide_prob: float = Field(0.5, description="chance of hiding each observed stage from the context in a training step")
    visible_l1_weight: float = Field(0.5, description="L1 weight of stages left in the context, relative to hidden ones")
    unknown_patient_prob: float = Field(
        0.5, description="chance a training sequence uses the 'unknown patient' embedding (how val/test patients are served)")
    n_layers_d: int = Field(3, description="PatchGAN depth (capped by image size); 3 gives a 70x70 receptive field")
    texture: bool = Field(True, description="samples get speckle and scan-line noise whose two amplitudes the "
                                          "adversarial loss learns (the zero-noise sample is the estimate)")
    adv_into_estimate: bool = Field(
        False, description="let the adversarial gradient reach the generator's estimate too, not only its texture head")
    lr_texture: float = Field(1e-2, description="learning rate of the two texture amplitudes (log scale)")
    context_subset_prob: float = Field(
        0.25, description="chance a visible stage enters the training context as the mean of a random subset of "
                         "its images (else all of them, as at generation time)")
    repeats: int = Field(1, description="passes over the training patients per epoch")
    decay_fraction: float = Field(0.5, description="final fraction of epochs with linearly decaying lr")
    augment: bool = Field(True, description="random flips, the same for all stages of a sequence")
    eval_samples: int = Field(4, description="K random samples per held-out case for the single-sample scores and "
                                             "the diversity figure (the held-out model score uses the zero-noise sample)")
