"""CRGAN: a conditional recurrent GAN that generates a patient's OCTA image at a treatment stage.

The seed design (LSTM over a patient's six stages fed patient embedding + stage
embedding + noise, transposed-conv decoder, discriminator conditioned on
(image, patient, stage)) made to produce sharp, patient-specific images:

* **Context.** Each observed stage enters as the mean of its real images plus their
  count (at generation: all of them, the least noisy view of the patient's anatomy at
  that stage; in training, sometimes a random subset, so noisier contexts are seen
  too). Stages not in the context are zeroed before anything reads them, so a hidden
  stage cannot leak (tested).
* **Generator.** A conv context encoder turns each context stage into a vector; the
  LSTM reads, at every stage, [stage embedding, patient embedding, z, masked mean of
  the context vectors, this stage's vector (masked), mask bit], so a stage's state
  depends on the stages before it and on what the patient looks like. Patients never
  seen in training (val/test, new clinics) use an extra 'unknown patient' embedding
  row, which training also uses at random: the context carries them. A U-Net decoder
  (weights shared by the stages; transposed convs, Tanh) turns the LSTM state into
  the image: its encoder reads three reference images of the patient — the nearest
  context stage at or before the target, the nearest at or after it, and the
  count-weighted mean of all context images — and its skips carry the patient's
  vessel layout at full resolution; the LSTM state enters at the bottleneck and by
  FiLM at every level. The output is residual: a learned per-pixel blend of the
  references (equal at init) inside the Tanh, plus the decoder's correction, so the
  network learns what changed (non-perfusion, noise) rather than how to copy.
* **Noise.** z enters the LSTM; after the Tanh, zero-mean multiplicative speckle and
  scan-line offsets with two learned amplitudes make each sample look like a single
  scan. The zero-noise sample is the model's estimate of the anatomy (the held-out
  score uses it); random samples differ from each other like repeat scans do.
* **Discriminator.** PatchGAN (32 to 256 px) with a *projection* condition (Miyato &
  Koyama 2018): per-patch logit = linear(features) + <features, e_stage + e_patient>.
  Chosen over concatenated embedding maps because it adds no input channels,
  conditions every patch, and is the better behaved of the two in conditional GANs;
  its patient table has an 'unknown' row so it can score val/test patients.
* **Losses.** The seed's adversarial losses in non-saturating form
  (L_D = BCE(D(x),1) + BCE(D(G),0), L_G = BCE(D(G),1)) weighted by lambda_adv, plus
  L1 of the estimate to the stage's mean real image: lambda_l1 on stages hidden from
  the context (hole filling, the job), times visible_l1_weight on visible ones. The L1
  target is the stage mean because repeat scans carry independent noise. By default
  the adversarial gradient trains the texture, not the estimate (adv_into_estimate:
  measured, it cost 0.7 dB held-out PSNR for +0.006 SSIM). An SSIM loss term was
  measured too and gained nothing, so it is not here. Optional (lambda_density, off by
  default): L1 between the soft vessel density of the estimate and of the stage mean
  (:func:`brvo_models.losses.soft_density`), the treatment effect as a target of its own;
  docs/usefulness.md has what it measured.

This module holds the networks, the Trainable and the loaders that rebuild the networks from
a checkpoint. The data (sequences, training batches, held-out cases, noise) lives in
:mod:`brvo_models.crgan_data`, sampling and held-out prediction in
:mod:`brvo_models.crgan_sampling`, the nearest / neighbour-mean baselines in
:mod:`brvo_models.stage_baselines`, and the checkpoint identity in :mod:`brvo_models.identity`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from brvo_models.configs import CRGANConfig
from brvo_models.course_model import LOWPASS_SIGMA, PopulationCourse, fit_population_course, gaussian_blur
from brvo_models.crgan_data import N_STAGES, PatientSequence, heldout_cases, pixel_noise, to_model
from brvo_models import batched_metrics
from brvo_models.crgan_sampling import predict_heldout, score_cases
from brvo_models.identity import load_described
from brvo_models.losses import otsu_threshold, soft_density
from brvo_models.metrics import mean_scores
from brvo_models.runtime import autocast, resolve_device
from storage.checkpoints import state_must_fit

MODEL_NAME = "crgan"
#: Gaussian sigma, times the image side, of the blur under the change weight: speckle is not change.
CHANGE_BLUR = 0.02
#: The smallest per-image maximum the change map is divided by ([0, 1] intensity): two stages that barely
#: differ keep weights near 1 instead of having their noise stretched to the full weight.
CHANGE_FLOOR = 0.05


# ------------------------------------------------------------------------------------ networks


def unet_levels(image_size: int) -> int:
    """Down-sampling levels of the U-Net: to a 4x4 bottleneck (64 px -> 4, 256 px -> 6)."""
    levels = int(round(math.log2(image_size))) - 2
    if image_size < 32 or 2 ** (levels + 2) != image_size:
        raise ValueError(f"image_size must be a power of two >= 32, got {image_size}")
    return levels


def gain_resolution(image_size: int) -> int:
    """Side of the coarse gain map of estimate_form 'gain': 1/8 of the image side, at least 8."""
    return max(8, image_size // 8)


def _gn(c: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: an image never depends on what else is in the batch,
    # so generation is the same alone or batched and in train or eval mode.
    return nn.GroupNorm(min(8, c), c)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ContextEncoder(nn.Module):
    """Stage image (1, H, W) -> vector (context_dim): strided convs + global average pooling."""

    def __init__(self, image_size: int, width: int, out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i in range(min(unet_levels(image_size), 4)):
            c = width * min(2**i, 8)
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), _gn(c), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x).mean(dim=(2, 3)))


class _Up(nn.Module):
    """Transposed conv x2 -> GroupNorm -> FiLM(cond) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
        self.norm = _gn(c_out)
        self.film = nn.Linear(cond_dim, 2 * c_out)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        gamma, beta = self.film(cond).chunk(2, dim=1)
        return F.relu(x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])


class CRGANGenerator(nn.Module):
    """(context images, visible mask, patient, z, pixel noise) -> images for selected (sequence, stage)."""

    def __init__(self, config: CRGANConfig, image_size: int, n_patients: int) -> None:
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.n_patients = n_patients
        self.unknown_index = n_patients  # the extra embedding row for patients never seen in training
        self.patient_ids: list[str] = []
        c = config
        self.patient_emb = nn.Embedding(n_patients + 1, c.patient_emb_dim)
        self.stage_emb = nn.Embedding(N_STAGES, c.stage_emb_dim)
        self.context_encoder = ContextEncoder(image_size, c.ngf, c.context_dim)
        lstm_in = c.stage_emb_dim + c.patient_emb_dim + c.z_dim + 2 * c.context_dim + 1
        self.lstm = nn.LSTM(lstm_in, c.hidden_dim, batch_first=True)
        cond_dim = c.hidden_dim + c.stage_emb_dim + 4  # + gaps to the neighbours and their presence
        self.cond = nn.Sequential(nn.Linear(cond_dim, c.hidden_dim), nn.ReLU(inplace=True))
        L = unet_levels(image_size)
        widths = [c.ngf * min(2**i, 8) for i in range(L)]
        self.down = nn.ModuleList()
        c_in = 3  # the nearest visible stage before and after the target, and the mean of all visible stages
        for i, w in enumerate(widths):
            block = [nn.Conv2d(c_in, w, 4, 2, 1)] + ([_gn(w)] if i > 0 else []) + [nn.LeakyReLU(0.2, inplace=True)]
            self.down.append(nn.Sequential(*block))
            c_in = w
        bottleneck = widths[-1]
        self.to_map = nn.Linear(c.hidden_dim, bottleneck * 16)
        self.fuse = nn.Sequential(nn.Conv2d(2 * bottleneck, bottleneck, 3, 1, 1), _gn(bottleneck), nn.ReLU(inplace=True))
        self.up = nn.ModuleList()
        c_in = bottleneck
        for i in reversed(range(L)):
            w_out = widths[i - 1] if i > 0 else c.ngf
            self.up.append(_Up(c_in, w_out, c.hidden_dim))
            c_in = w_out + (widths[i - 1] if i > 0 else 3)  # concat the skip (or the raw references)
        self.head = nn.Conv2d(c_in, 1, 3, 1, 1)
        self.mix = nn.Conv2d(c_in, 3, 3, 1, 1)
        # estimate_form 'gain': a log-gain map read from the up path at gain_resolution(image_size)
        self.gain_level: int | None = None
        self.gain_head: nn.Conv2d | None = None
        if c.estimate_form == "gain":
            self.gain_level = int(round(math.log2(gain_resolution(image_size) / 8)))
            gain_width = (widths[L - 2 - self.gain_level] if L - 2 - self.gain_level >= 0 else c.ngf) * 2
            self.gain_head = nn.Conv2d(gain_width, 1, 3, 1, 1)
        self.course = PopulationCourse() if c.population_course else None  # fitted by CRGAN, then frozen
        # log amplitudes of multiplicative speckle and of scan-line offsets (see forward)
        self.texture = nn.ParameterDict({"log_amp": nn.Parameter(torch.tensor([-3.0, -4.0]))}) if c.texture else None
        _init(self)
        if self.gain_head is not None:  # gain 1 at init: the estimate starts as the blend of the references
            nn.init.zeros_(self.gain_head.weight)

    # -- pieces ---------------------------------------------------------------------------

    def encode_sequence(self, context: torch.Tensor, visible: torch.Tensor, patient: torch.Tensor,
                        z: torch.Tensor) -> torch.Tensor:
        """LSTM states (B, 6, hidden) from masked context (B, 6, 1, H, W), visible (B, 6)."""
        B = context.shape[0]
        m = visible.float()
        enc = self.context_encoder(context.flatten(0, 1)).view(B, N_STAGES, -1) * m[..., None]
        pooled = enc.sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        stages = torch.arange(N_STAGES, device=context.device)
        inputs = torch.cat([
            self.stage_emb(stages)[None].expand(B, -1, -1),
            self.patient_emb(patient)[:, None].expand(-1, N_STAGES, -1),
            z[:, None].expand(-1, N_STAGES, -1),
            pooled[:, None].expand(-1, N_STAGES, -1),
            enc,
            m[..., None],
        ], dim=2)
        with torch.autocast(context.device.type, enabled=False):  # the LSTM stays fp32 under mixed precision
            out, _ = self.lstm(inputs.float())
        return out

    @staticmethod
    def neighbours(visible: torch.Tensor, sel_b: torch.Tensor, sel_t: torch.Tensor):
        """For each selected (b, t): nearest visible stage <= t and >= t (-1 where none)."""
        vis = visible[sel_b]  # (N, 6)
        stages = torch.arange(N_STAGES, device=visible.device)[None]
        t = sel_t[:, None]
        before = torch.where(vis & (stages <= t), stages, torch.full_like(stages, -1)).amax(1)
        after = torch.where(vis & (stages >= t), stages, torch.full_like(stages, N_STAGES)).amin(1)
        after = torch.where(after == N_STAGES, torch.full_like(after, -1), after)
        return before, after

    @staticmethod
    def _anchor_lowpass(mean: torch.Tensor, ref_before: torch.Tensor, ref_after: torch.Tensor, before: torch.Tensor,
                        after: torch.Tensor, target: torch.Tensor, has_b: torch.Tensor,
                        has_a: torch.Tensor) -> torch.Tensor:
        """``mean`` (N, 1, H, W) in [-1, 1] with its low-pass replaced by the moved references': the two
        neighbours (already moved to the target stage) weighted by closeness, one of them where the target lies
        outside the visits. A correction of the low-pass only, so vessels and texture are the
        generator's and the regional level, which carries the course, is the population course's. Additive, not
        a gain: a gain cannot lift a region the decoder left black."""
        span = (after - before).clamp_min(1).to(mean.dtype)
        w_after = torch.where(has_b & has_a, (target - before).to(mean.dtype) / span,
                              has_a.to(mean.dtype) * (~has_b).to(mean.dtype))
        w_after = w_after[:, None, None, None]
        anchor01 = (((1 - w_after) * ref_before + w_after * ref_after) + 1) / 2
        mean01 = (mean + 1) / 2
        sigma = max(LOWPASS_SIGMA * mean.shape[-1], 0.5)
        shift = gaussian_blur(anchor01, sigma) - gaussian_blur(mean01, sigma)
        return ((mean01 + shift.to(mean.dtype)).clamp(0, 1) * 2 - 1).to(mean.dtype)

    def forward(self, context: torch.Tensor, visible: torch.Tensor, patient: torch.Tensor, z: torch.Tensor,
                pix: torch.Tensor, sel_b: torch.Tensor, sel_t: torch.Tensor, return_mean: bool = False,
                counts: torch.Tensor | None = None):
        """Images (N, 1, H, W) in [-1, 1] for the selected (sequence sel_b[i], stage sel_t[i]).

        context (B, 6, 1, H, W) in [-1, 1]; visible (B, 6) bool; patient (B,) long;
        z (B, z_dim); pix (N, 2, H, W) pixel noise of each selected image (:func:`pixel_noise`).
        ``return_mean``: also return the image before the texture head (what L1 trains).
        ``counts`` (B, 6): real images behind each context stage (weights of the pooled reference).
        """
        visible = visible.bool()
        context = context * visible[:, :, None, None, None].to(context.dtype)  # nothing hidden gets in
        states = self.encode_sequence(context, visible, patient, z)
        before, after = self.neighbours(visible, sel_b, sel_t)
        has_b, has_a = before >= 0, after >= 0
        before_i = torch.where(has_b, before, after).clamp_min(0)
        after_i = torch.where(has_a, after, before).clamp_min(0)
        m = visible.to(context.dtype)
        if counts is not None:
            m = m * counts.to(context.dtype)
        pooled = (context * m[:, :, None, None, None]).sum(1) / m.sum(1).clamp_min(1e-6)[:, None, None, None]
        ref_before, ref_after = context[sel_b, before_i], context[sel_b, after_i]
        if self.course is not None:  # each neighbour moved to the target stage by the population course
            ref_before = (self.course.project((ref_before + 1) / 2, before_i, sel_t) * 2 - 1).to(context.dtype)
            ref_after = (self.course.project((ref_after + 1) / 2, after_i, sel_t) * 2 - 1).to(context.dtype)
        refs = torch.cat([ref_before, ref_after, pooled[sel_b]], dim=1)  # (N, 3, H, W)
        refs = refs * (has_b | has_a).to(refs.dtype)[:, None, None, None]
        t = sel_t.to(torch.float32)
        gaps = torch.stack([
            torch.where(has_b, (t - before.float()) / (N_STAGES - 1), torch.ones_like(t)),
            torch.where(has_a, (after.float() - t) / (N_STAGES - 1), torch.ones_like(t)),
            has_b.float(), has_a.float()], dim=1).to(states.dtype)
        cond = self.cond(torch.cat([states[sel_b, sel_t], self.stage_emb(sel_t), gaps], dim=1))
        skips = []
        x = refs
        for block in self.down:
            x = block(x)
            skips.append(x)
        B, C = x.shape[:2]
        x = self.fuse(torch.cat([x, self.to_map(cond).view(B, C, 4, 4)], dim=1))
        skips = skips[:-1][::-1] + [refs]
        gain_features = None
        for level, (block, skip) in enumerate(zip(self.up, skips)):
            x = torch.cat([block(x, cond), skip], dim=1)
            if level == self.gain_level:
                gain_features = x
        # Residual on the references: a learned per-pixel blend of the three reference images
        # (equal weights at init) enters the Tanh's pre-activation, so the decoder learns the
        # correction (where the stage changed, what is noise) rather than the copy.
        if self.config.residual_base == "nearest":
            # the change from the nearest visible stage, conditioned on the signed gap (cond)
            base = context[sel_b, nearest_visible(visible, sel_b, sel_t)]
        else:
            w = torch.softmax(self.mix(x), dim=1)
            base = (w * refs).sum(1, keepdim=True)
        if self.gain_head is not None:
            # A regional change only: the blend times a smooth gain (exp of a coarse log-gain map, 1 at init)
            log_gain = F.interpolate(self.gain_head(gain_features), size=base.shape[-2:], mode="bilinear",
                                     align_corners=False)
            mean = (((base + 1) / 2) * log_gain.exp()).clamp(0, 1) * 2 - 1
        else:
            pre = self.head(x) + torch.atanh(0.98 * base)
            mean = torch.tanh(pre)
        if self.course is not None and self.config.course_anchor:
            mean = self._anchor_lowpass(mean, ref_before, ref_after, before, after, sel_t, has_b, has_a)
        if self.texture is None:
            return (mean, mean) if return_mean else mean
        # Texture, after the Tanh: multiplicative speckle (white noise scaled by intensity)
        # and scan-line offsets (one value per row), both zero-mean, so the noise changes
        # samples but not their expectation. Two learned amplitudes, trained only by the
        # adversarial loss (L1 sees ``mean``): the discriminator sets the noise level of a
        # single scan. A per-pixel amplitude map was tried: it learned to dither uncertain
        # regions into salt-and-pepper. By default the adversarial gradient stops at the
        # texture (config.adv_into_estimate): measured on the phantom, letting it reshape the
        # estimate cost 0.7 dB held-out PSNR.
        anchor = mean if self.config.adv_into_estimate else mean.detach()
        amp = self.texture["log_amp"].exp().to(anchor.dtype)
        pix = pix.to(anchor.dtype)
        noise = amp[0] * (anchor + 1) / 2 * pix[:, :1] + amp[1] * pix[:, 1:]
        sample = (anchor + 2 * noise).clamp(-1, 1)  # x2: amplitudes are on the [0, 1] scale
        return (sample, mean) if return_mean else sample


class CRGANDiscriminator(nn.Module):
    """PatchGAN with a projection condition on (stage, patient): per-patch logits (N, 1, h, w)."""

    def __init__(self, config: CRGANConfig, image_size: int, n_patients: int) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        n_layers = max(1, min(config.n_layers_d, unet_levels(image_size) - 1))
        layers: list[nn.Module] = [sn(nn.Conv2d(1, config.ndf, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        c_in = config.ndf
        for i in range(1, n_layers):
            c = config.ndf * min(2**i, 8)
            layers += [sn(nn.Conv2d(c_in, c, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        c = config.ndf * min(2**n_layers, 8)
        layers += [sn(nn.Conv2d(c_in, c, 4, 1, 1)), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.linear = sn(nn.Conv2d(c, 1, 1))
        self.stage_emb = nn.Embedding(N_STAGES, c)
        self.patient_emb = nn.Embedding(n_patients + 1, c)
        self.unknown_index = n_patients
        nn.init.normal_(self.stage_emb.weight, 0.0, 0.02)
        nn.init.normal_(self.patient_emb.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor, stage: torch.Tensor, patient: torch.Tensor) -> torch.Tensor:
        h = self.features(images)
        e = self.stage_emb(stage) + self.patient_emb(patient)
        return self.linear(h) + (h * e[:, :, None, None]).sum(1, keepdim=True)


# ------------------------------------------------------------------------------------ the Trainable


class CRGAN:
    """The CRGAN as a :class:`brvo_models.training.Trainable` (fit sets the lr of every param group)."""

    name = MODEL_NAME

    def __init__(self, config: CRGANConfig, image_size: int, patient_ids: Sequence[str],
                 device: torch.device | str = "cpu", val_seqs: Sequence[PatientSequence] = (),
                 score_on: torch.device | str | None = "auto",
                 texture_amplitudes: tuple[float, float] | None = None,
                 train_seqs: Sequence[PatientSequence] = (), seed: int = 0) -> None:
        self.config = config
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.patient_ids = [str(p) for p in patient_ids]
        n = len(self.patient_ids)
        self.generator = CRGANGenerator(config, image_size, n).to(self.device)
        self.generator.patient_ids = list(self.patient_ids)
        self.course_summary: dict | None = None
        if self.generator.course is not None:
            # The population course, fitted once on the training patients' stage pairs, then frozen: the GAN
            # learns what the course does not explain. Deterministic given the training data and seed.
            course, self.course_summary = fit_population_course(
                ({s: seq.stage_mean(s) for s in seq.observed} for seq in train_seqs), seed=seed)
            self.generator.course.load_state_dict(course.state_dict())
            self.generator.course.requires_grad_(False)
        self.discriminator = CRGANDiscriminator(config, image_size, n).to(self.device)
        betas = (config.beta1, config.beta2)
        texture = set(self.generator.texture.parameters()) if self.generator.texture is not None else set()
        groups = [{"params": [p for p in self.generator.parameters() if p not in texture], "lr": config.lr_g}]
        if texture and config.texture_fit == "moments":
            # fixed to the repeat-scan spread (crgan_data.texture_amplitudes), never trained
            if texture_amplitudes is None:
                raise ValueError("texture_fit 'moments' needs the training patients' texture_amplitudes")
            with torch.no_grad():
                self.generator.texture["log_amp"].copy_(torch.tensor(texture_amplitudes).clamp_min(1e-6).log())
            self.generator.texture["log_amp"].requires_grad_(False)
        elif texture:
            groups.append({"params": list(self.generator.texture.parameters()), "lr": config.lr_texture})
        self.opt_g = torch.optim.Adam(groups, lr=config.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=betas)
        self.val_cases = heldout_cases(val_seqs)
        #: where validation scores are computed: the GPU on CUDA, else None (the numpy path)
        self.metrics_device = batched_metrics.metrics_device(self.device, score_on)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def _tensors(self, batch: dict) -> dict[str, torch.Tensor]:
        """A training batch (:func:`brvo_models.crgan_data.make_train_batches`) as tensors on the device.

        On the CPU (the reference path) the noise comes from a CPU generator seeded with the
        batch's ``noise_seed``. On CUDA it is drawn on the GPU from a CUDA generator with that seed
        (same distributions and seed, other numbers; no 2 x N x H x W draw on the host and copy
        per step), and the arrays go up through pinned memory without blocking the host.
        """
        dev = self.device
        patient = torch.as_tensor(batch["patient"])
        patient = torch.where(patient < 0, torch.full_like(patient, self.generator.unknown_index), patient)
        B, N = len(patient), len(batch["sel_b"])
        if dev.type == "cuda":
            g = torch.Generator(device=dev).manual_seed(batch["noise_seed"])

            def up(a) -> torch.Tensor:
                return torch.as_tensor(a).pin_memory().to(dev, non_blocking=True)

            return {
                "context": to_model(up(batch["context"]))[:, :, None], "visible": up(batch["visible"]),
                "counts": up(batch["counts"]), "patient": up(patient),
                "z": torch.randn(B, self.config.z_dim, generator=g, device=dev),
                "pix": pixel_noise(N, self.image_size, g),
                "sel_b": up(batch["sel_b"]), "sel_t": up(batch["sel_t"]), "hidden": up(batch["hidden"]),
                "targets": to_model(up(batch["targets"]))[:, None], "reals": to_model(up(batch["reals"]))[:, None],
            }
        g = torch.Generator().manual_seed(batch["noise_seed"])
        z = torch.randn(B, self.config.z_dim, generator=g)
        pix = pixel_noise(N, self.image_size, g)
        return {
            "context": to_model(batch["context"])[:, :, None].to(dev),
            "visible": torch.as_tensor(batch["visible"]).to(dev),
            "counts": torch.as_tensor(batch["counts"]).to(dev),
            "patient": patient.to(dev), "z": z.to(dev), "pix": pix.to(dev),
            "sel_b": torch.as_tensor(batch["sel_b"]).to(dev), "sel_t": torch.as_tensor(batch["sel_t"]).to(dev),
            "hidden": torch.as_tensor(batch["hidden"]).to(dev),
            "targets": to_model(batch["targets"])[:, None].to(dev),
            "reals": to_model(batch["reals"])[:, None].to(dev),
        }

    def stage(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch ready for :meth:`train_step` on the model's device (fit's prefetch thread calls this)."""
        return batch if _staged(batch) else self._tensors(batch)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Generator loss terms on a batch (no optimiser step): used by train_step and tests."""
        t = self.stage(batch)
        fake, mean = self._generate(t)
        return self._g_losses(t, fake, mean)

    def _generate(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device):
            fake, mean = self.generator(t["context"], t["visible"], t["patient"], t["z"], t["pix"], t["sel_b"],
                                        t["sel_t"], return_mean=True, counts=t["counts"])
        return fake.float(), mean.float()

    def _d_logits(self, images: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device):
            out = self.discriminator(images, t["sel_t"], t["patient"][t["sel_b"]])
        return out.float()

    def _g_losses(self, t: dict[str, torch.Tensor], fake: torch.Tensor, mean: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        if c.change_weight > 0:
            weight = change_weight_map(t["targets"], t["context"], t["visible"], t["sel_b"], t["sel_t"],
                                       c.change_weight)
            err = ((mean - t["targets"]).abs() * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
        else:
            err = (mean - t["targets"]).abs().mean(dim=(1, 2, 3))
        hid = t["hidden"].float()
        l1_hidden = (err * hid).sum() / hid.sum().clamp_min(1.0)
        l1_visible = (err * (1 - hid)).sum() / (1 - hid).sum().clamp_min(1.0)
        logits = self._d_logits(fake, t) if c.lambda_adv > 0 else None
        adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) if logits is not None \
            else torch.zeros((), device=fake.device)
        total = c.lambda_l1 * (l1_hidden + c.visible_l1_weight * l1_visible) + c.lambda_adv * adv
        out = {"l1_hidden": l1_hidden, "l1_visible": l1_visible, "adv_g": adv}
        if c.lambda_density > 0:
            # The treatment effect as a target of its own: reperfusion changes a stage's vessel density by
            # 1-2 % of its level, a small part of the pixel L1, whose per-pixel optimum leaves out vessels
            # that are less likely than not. This term compares one number per image (the share of pixels
            # above the targets' Otsu threshold, soft) with the stage mean's.
            estimate, target = (mean + 1) / 2, (t["targets"] + 1) / 2
            threshold = otsu_threshold(target)
            d_est = soft_density(estimate, threshold, c.density_softness)
            d_tgt = soft_density(target, threshold, c.density_softness)
            if c.density_target == "level":
                d_err = (d_est - d_tgt).abs()
                density_hidden = (d_err * hid).sum() / hid.sum().clamp_min(1.0)
                density_visible = (d_err * (1 - hid)).sum() / (1 - hid).sum().clamp_min(1.0)
                total = total + c.lambda_density * (density_hidden + c.visible_l1_weight * density_visible)
                out.update(density_hidden=density_hidden, density_visible=density_visible)
            else:
                # every pair of hidden stages of one sequence, later minus earlier
                sel_b, sel_t, h = t["sel_b"], t["sel_t"], t["hidden"].bool()
                pairs = ((sel_b[:, None] == sel_b[None, :]) & h[:, None] & h[None, :]
                         & (sel_t[:, None] > sel_t[None, :])).float()
                change_err = ((d_est[:, None] - d_est[None, :]) - (d_tgt[:, None] - d_tgt[None, :])).abs()
                density_change = (change_err * pairs).sum() / pairs.sum().clamp_min(1.0)
                total = total + c.lambda_density * density_change
                out.update(density_change=density_change)
        return {"loss_g": total, **out}

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One D step then one G step; the losses come back as detached tensors on the model's
        device (nothing here waits for the GPU: fit sums them there). ``batch``: raw or staged."""
        t = self.stage(batch)
        fake, mean = self._generate(t)
        out: dict[str, torch.Tensor] = {}
        if self.config.lambda_adv > 0:
            real_logits = self._d_logits(t["reals"], t)
            fake_logits = self._d_logits(fake.detach(), t)
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            out["loss_d"] = loss_d.detach()
        losses = self._g_losses(t, fake, mean)
        self.opt_g.zero_grad(set_to_none=True)
        losses["loss_g"].backward()
        self.opt_g.step()
        out.update({k: v.detach() for k, v in losses.items()})
        return out

    def validate(self) -> dict[str, float]:
        """Held-out reconstruction on val patients: each observed stage hidden in turn; score = mean SSIM."""
        if not self.val_cases:
            return {"score": float("nan")}
        # the zero-noise sample: the model's point estimate, as in the held-out report
        preds = predict_heldout(self.generator, self.val_cases, seeds=[None], device=self.device)[:, 0]
        rows = score_cases(list(preds), [seq.images[s] for seq, s in self.val_cases], self.metrics_device)
        m = mean_scores(rows)
        out = {"score": m["ssim"], "ssim": m["ssim"], "psnr": m["psnr"], "mse": m["mse"]}
        if self.config.val_course_weight > 0:
            # Held-out SSIM rewards copying the neighbour; the course error rewards carrying the change.
            course_mae = course_error(self.val_cases, preds)
            if course_mae is not None:
                out["course_mae"] = course_mae
                out["score"] = m["ssim"] - self.config.val_course_weight * course_mae
        return out




def nearest_visible(visible: torch.Tensor, sel_b: torch.Tensor, sel_t: torch.Tensor) -> torch.Tensor:
    """For each selected (b, t): the visible stage of sequence b nearest to t, a tie to the earlier (t itself
    when visible); every sequence has one visible stage."""
    stages = torch.arange(N_STAGES, device=visible.device)[None]
    distance = (stages - sel_t[:, None]).abs() * 2 + (stages > sel_t[:, None]).long()  # ties: earlier first
    distance = torch.where(visible[sel_b].bool(), distance, torch.full_like(distance, 10 * N_STAGES))
    return distance.argmin(dim=1)


def change_weight_map(targets: torch.Tensor, context: torch.Tensor, visible: torch.Tensor, sel_b: torch.Tensor,
                      sel_t: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel L1 weights (N, 1, H, W): 1 + weight * d, d = |blur(target) - blur(nearest visible stage)|
    divided by its per-image maximum (at least CHANGE_FLOOR on the [0, 1] scale; the images are on [-1, 1]).

    The blur (sigma CHANGE_BLUR of the side) keeps speckle out, so the weight marks the region where the
    stage changed (non-perfusion growing or reperfusing); where nothing changed the weight is exactly 1.
    """
    ref = context[sel_b, nearest_visible(visible, sel_b, sel_t)].float()  # (N, 1, H, W)
    sigma = max(CHANGE_BLUR * targets.shape[-1], 0.5)
    d = (gaussian_blur(targets, sigma) - gaussian_blur(ref, sigma)).abs() / 2  # [0, 1] intensity units
    scale = d.amax(dim=(1, 2, 3), keepdim=True).clamp_min(CHANGE_FLOOR)
    return (1 + weight * d / scale).detach()


def course_error(cases: Sequence[tuple[PatientSequence, int]], preds) -> float | None:
    """Mean absolute error (percentage points) of the predicted change in the non-perfusion index from the
    nearest earlier observed stage, over held-out cases that have an earlier stage; None when none has.

    True change: the mean index of the stage's real images minus that of the earlier stage's images;
    predicted: the index of the prediction (float [0, 1]) minus the same reference.
    """
    from brvo_models.fill_truth import non_perfusion_index

    errors = []
    for (seq, stage), pred in zip(cases, preds):
        earlier = [s for s in seq.observed if s < stage]
        if not earlier:
            continue
        ref = float(np.mean([non_perfusion_index(x) for x in seq.images[max(earlier)]]))
        true = float(np.mean([non_perfusion_index(x) for x in seq.images[stage]]))
        errors.append(abs((non_perfusion_index(np.asarray(pred) * 255.0) - ref) - (true - ref)))
    return float(np.mean(errors)) if errors else None


def _staged(batch: dict) -> bool:
    return isinstance(batch.get("context"), torch.Tensor)


# ------------------------------------------------------------------------------------ loading


def load_generator(checkpoint_path: str | os.PathLike, device: torch.device | str = "auto",
                   image_size: int | None = None) -> tuple[CRGANGenerator, dict[str, int], torch.device]:
    """(generator in eval mode on ``device``, patient_id -> embedding row, device) from a checkpoint.

    The network is built from the config stored in the checkpoint (:mod:`brvo_models.identity`);
    ``image_size``, when given, must be the checkpoint's (else a one-line CheckpointError), as must
    the model. Patients not in the mapping (val/test, new ones) are generated with index None
    ('unknown').
    """
    loaded = load_described(checkpoint_path, MODEL_NAME, CRGANConfig, image_size)
    index = _patient_index(loaded.state)
    gen = CRGANGenerator(loaded.config, loaded.image_size, len(index))
    with state_must_fit(checkpoint_path):  # weights of another shape: a one-line CheckpointError
        gen.load_state_dict(loaded.state["modules"]["generator"])
    gen.patient_ids = list(index)
    device = resolve_device(device)
    return gen.to(device).eval(), index, device


def load_discriminator(checkpoint_path: str | os.PathLike, device: torch.device | str = "auto",
                       image_size: int | None = None) -> tuple[CRGANDiscriminator, dict[str, int], torch.device]:
    """(discriminator in eval mode, patient_id -> embedding row, device) for
    :func:`brvo_models.crgan_sampling.realism`; built and checked as :func:`load_generator`."""
    loaded = load_described(checkpoint_path, MODEL_NAME, CRGANConfig, image_size)
    index = _patient_index(loaded.state)
    disc = CRGANDiscriminator(loaded.config, loaded.image_size, len(index))
    with state_must_fit(checkpoint_path):
        disc.load_state_dict(loaded.state["modules"]["discriminator"])
    device = resolve_device(device)
    return disc.to(device).eval(), index, device


def _patient_index(state: dict[str, Any]) -> dict[str, int]:
    """The training patients in embedding order, from the checkpoint meta (a list of str)."""
    return {str(pid): i for i, pid in enumerate(state["meta"].get("patient_ids", []))}
