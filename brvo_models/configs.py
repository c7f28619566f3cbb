"""Typed model configs. Widths and schedules live here so the same code trains a
small 64 px model on a laptop CPU (preset 'demo') and a paper-size one on a GPU ('full').
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pix2PixConfig(_Frozen):
    """Pix2Pix (Isola et al. 2017) image -> vessel label; defaults follow the reference."""

    ngf: int = Field(64, description="generator width of the first layer")
    ndf: int = Field(64, description="discriminator width of the first layer")
    n_layers_d: int = Field(3, description="PatchGAN depth; 3 gives the 70x70 receptive field")
    norm: Literal["batch", "instance"] = "batch"
    dropout: bool = True
    lambda_l1: float = 100.0
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 1
    epochs: int = Field(200, description="total epochs: the first half at constant lr, then linear decay")
    epochs_decay: int | None = Field(None, description="epochs of linear decay at the end (default: half of epochs)")
    threshold: float = Field(0.5, description="probability above which a pixel is labelled vessel")
    augment: bool = Field(True, description="aligned flips and small rotations of (image, label)")
    max_rotation_deg: float = 10.0


class CRGANConfig(_Frozen):
    """Conditional recurrent GAN: patient + stage + noise (+ observed images) -> image per stage."""

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
