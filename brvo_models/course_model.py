"""The population course: how a region's flow signal changes between two treatment stages, learned from every
within-patient pair of observed stages and applied to one patient's nearest visit.

Why: the generator is trained to reconstruct held-out stages image by image, and the treatment effect is a
small regional change under a scan's noise, so a per-pixel loss learns to copy the nearest visit. The effect
itself is a population quantity: in BRVO, non-perfused (dark) regions reperfuse under anti-VEGF treatment,
faster early than late. This model learns it directly, as a smooth multiplicative gain of the low-pass
image: for a pixel whose low-pass signal, relative to the image's perfused level, is ``u`` at stage ``s``,
the log of the low-pass ratio between stage ``t`` and stage ``s`` (a three-input MLP of ``u``, ``s``, ``t``).
Fitted by least squares on every ordered pair of observed stages of the training patients (stage means), it
has a few hundred weights and sees hundreds of thousands of pixels, so it does not fit a patient's noise.
Nothing here is specific to the phantom: the features are the image's own low-pass signal and the stages.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#: the low-pass blur's sigma as a fraction of the image side: the scale of a region, not of a vessel
LOWPASS_SIGMA = 0.05
#: the perfused level of an image: this quantile of its low-pass signal
PERFUSED_QUANTILE = 0.75
#: intensity floor (on [0, 1]) under the logarithms
EPS = 1.0 / 255.0
N_STAGES = 6


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images, edges replicated, in float32."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = F.pad(x.float(), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    return F.conv2d(x, taps.view(1, 1, -1, 1))


def coarse(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, H/4, W/4) (at least 8 px) by area averaging: a low-pass image has nothing finer,
    and the course is evaluated there (16 times fewer pixels) and upsampled bilinearly."""
    side = max(8, images.shape[-1] // 4)
    return F.interpolate(images, size=(side, side), mode="area")


def lowpass(images01: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) on [0, 1] -> their low-pass signal (sigma LOWPASS_SIGMA of the side)."""
    return gaussian_blur(images01, max(LOWPASS_SIGMA * images01.shape[-1], 0.5))


class PopulationCourse(nn.Module):
    """(source image, its stage, a target stage) -> smooth log-gain map that moves the source to the target."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # gain 1 (no change) until fitted

    @staticmethod
    def features(source01: torch.Tensor, source_stage: torch.Tensor, target_stage: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) on the coarse grid (:func:`coarse`): the low-pass signal relative to the image's perfused
        level, and both stages on [0, 1]."""
        lp = coarse(lowpass(source01))[:, 0]
        level = torch.quantile(lp.flatten(1), PERFUSED_QUANTILE, dim=1).clamp_min(EPS)
        u = (lp / level[:, None, None]).clamp(0, 2)
        s = (source_stage.float() / (N_STAGES - 1))[:, None, None].expand_as(u)
        t = (target_stage.float() / (N_STAGES - 1))[:, None, None].expand_as(u)
        return torch.stack([u, s, t], dim=-1)

    def log_gain(self, source01: torch.Tensor, source_stage: torch.Tensor, target_stage: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) log-gain; exactly 0 where source and target stage are the same."""
        out = self.net(self.features(source01.float(), source_stage, target_stage))[..., 0][:, None]
        out = F.interpolate(out, size=source01.shape[-2:], mode="bilinear", align_corners=False)
        return out * (source_stage != target_stage).float()[:, None, None, None]

    def project(self, source01: torch.Tensor, source_stage: torch.Tensor, target_stage: torch.Tensor) -> torch.Tensor:
        """The source image (N, 1, H, W) on [0, 1] moved to the target stage by the population course."""
        return (source01 * self.log_gain(source01, source_stage, target_stage).exp()).clamp(0, 1)


def stage_pairs(stage_means: Iterable[dict[int, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered pair s != t of each patient's observed stages, from per-patient {stage: mean image on [0, 1]}:
    (sources (P, H, W), targets (P, H, W), s (P,), t (P,))."""
    sources, targets, s_idx, t_idx = [], [], [], []
    for means in stage_means:
        for s, source in means.items():
            for t, target in means.items():
                if s != t:
                    sources.append(source)
                    targets.append(target)
                    s_idx.append(s)
                    t_idx.append(t)
    if not sources:
        return (np.zeros((0, 1, 1), np.float32),) * 2 + (np.zeros(0, np.int64),) * 2
    return (np.stack(sources).astype(np.float32), np.stack(targets).astype(np.float32),
            np.asarray(s_idx, np.int64), np.asarray(t_idx, np.int64))


def fit_population_course(stage_means: Iterable[dict[int, np.ndarray]], seed: int = 0, steps: int = 1500,
                          batch_pixels: int = 4096, lr: float = 1e-2) -> tuple[PopulationCourse, dict]:
    """Least-squares fit of the course on the low-pass log ratios of every within-patient stage pair.

    Returns the model (frozen, CPU) and a summary: pairs, pixels, the final loss over every pixel, and whether it
    was fitted. With no pair (every patient seen at one stage) the model stays the identity (gain 1) and the
    summary says so.
    """
    sources, targets, s_idx, t_idx = stage_pairs(stage_means)
    summary = {"pairs": int(len(sources)), "pixels": 0, "loss": None, "fitted": False}
    if not len(sources):
        model = PopulationCourse()
    else:
        g = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        model = PopulationCourse()
        src = torch.as_tensor(sources)[:, None]
        x = model.features(src, torch.as_tensor(s_idx), torch.as_tensor(t_idx)).reshape(-1, 3)
        y = (torch.log(coarse(lowpass(torch.as_tensor(targets)[:, None])) + EPS)
             - torch.log(coarse(lowpass(src)) + EPS)).reshape(-1, 1)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(len(y), (min(batch_pixels, len(y)),), generator=g)
            loss = ((model.net(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            full = float(((model.net(x) - y) ** 2).mean())
        summary.update(pixels=int(len(y)), loss=full, fitted=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), summary
