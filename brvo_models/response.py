"""The treatment-response forecaster of the usefulness protocol (tasks/usefulness.py).

What a BRVO researcher asks of longitudinal OCTA: does the non-perfused sector reperfuse under
anti-VEGF treatment, and by how much by which injection. Vessel density is the standard OCTA
biomarker of it, and the task uses only what every real dataset has (images, labels, stage,
patient). So the forecaster reads one visit's image and vessel label at stage ``a`` and the later
stage ``b`` and predicts the patient's vessel density at ``b`` (the mean over that stage's labels),
as the change from the visit's own density ("no change" is its zero). Synthetic rows enter it as
visits and as later stages, so a generator that misses the stage effect, or a labeller whose
density is biased, shows here as a larger error on real test patients.

The segmentation task's model is the project's one supervised segmenter
(:mod:`brvo_models.segmenter`); this module holds only the forecaster. Trained for a fixed
number of steps on batches sampled uniformly from the pairs; each pair carries a loss weight (how
a mix down-weights synthetic rows). The recipe is a frozen pydantic object chosen on validation
patients (:class:`brvo_models.configs.ForecastRecipe`), then the same for every arm. No Prefect.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brvo_models.configs import ForecastRecipe

def _d4(x: torch.Tensor, k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample rotation by k*90 degrees and optional horizontal flip (the dihedral group)."""
    out = torch.empty_like(x)
    for r in range(4):
        for f in (False, True):
            sel = (k == r) & (flip == f)
            if sel.any():
                y = torch.rot90(x[sel], r, dims=(-2, -1))
                out[sel] = y.flip(-1) if f else y
    return out


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, np.float32) / 255.0)[:, None]




class ResponseForecaster(nn.Module):
    """(image, label) of a visit at stage a, stages (a, b) -> predicted density change a -> b (scaled).

    The prediction is ``prior[a, b]`` (the training pairs' weighted mean change per stage pair, a
    fixed buffer) plus what the CNN reads from the visit; the CNN's last layer starts at zero, so an
    untrained forecaster is the stage-mean forecaster and training adds the patient-specific part.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("prior", torch.zeros(6, 6))
        chans, layers, c_in = [width, 2 * width, 4 * width, 4 * width], [], 2
        for c in chans:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in + 12, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, stage_a: torch.Tensor, stage_b: torch.Tensor) -> torch.Tensor:
        stages = torch.cat([F.one_hot(stage_a, 6), F.one_hot(stage_b, 6)], dim=1).float()
        return self.prior[stage_a, stage_b] + self.head(torch.cat([self.encoder(x * 2 - 1), stages], dim=1))[:, 0]


def stage_pair_prior(stage_a: np.ndarray, stage_b: np.ndarray, change: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(6, 6) weighted mean change per (a, b); a pair never seen gets the weighted mean over its gap b - a,
    else the overall weighted mean."""
    table = np.full((6, 6), np.nan)
    overall = float(np.average(change, weights=weights))
    by_gap = {}
    for gap in range(1, 6):
        sel = (stage_b - stage_a) == gap
        by_gap[gap] = float(np.average(change[sel], weights=weights[sel])) if sel.any() else overall
    for a in range(6):
        for b in range(a + 1, 6):
            sel = (stage_a == a) & (stage_b == b)
            table[a, b] = float(np.average(change[sel], weights=weights[sel])) if sel.any() else by_gap[b - a]
    return np.nan_to_num(table, nan=overall)


def _pair_inputs(images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    return torch.cat([_to_float(images), torch.from_numpy(np.asarray(labels, np.float32))[:, None]], dim=1)


def train_forecaster(images: np.ndarray, labels: np.ndarray, stage_a: np.ndarray, stage_b: np.ndarray,
                     target_change: np.ndarray, weights: np.ndarray | None, recipe: ForecastRecipe,
                     seed: int) -> ResponseForecaster:
    """Fit on visit rows (image, label at ``stage_a``) and the patient's density change to ``stage_b``."""
    if len(images) == 0:
        raise ValueError("train_forecaster: no training pairs")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ResponseForecaster(recipe.width)
    w_np = np.ones(len(images)) if weights is None else np.asarray(weights, np.float64)
    if recipe.stage_prior:
        prior = stage_pair_prior(np.asarray(stage_a), np.asarray(stage_b), np.asarray(target_change, np.float64), w_np)
        net.prior.copy_(torch.as_tensor(prior * recipe.density_scale, dtype=torch.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15)
    x_all = _pair_inputs(images, labels)
    a_all, b_all = torch.as_tensor(np.asarray(stage_a, np.int64)), torch.as_tensor(np.asarray(stage_b, np.int64))
    t_all = torch.as_tensor(np.asarray(target_change, np.float32)) * recipe.density_scale
    w_all = torch.ones(len(images)) if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
    net.train()
    for _ in range(recipe.steps):
        idx = torch.randint(0, len(x_all), (recipe.batch_size,), generator=g)
        k = torch.randint(0, 4, (recipe.batch_size,), generator=g)
        flip = torch.rand(recipe.batch_size, generator=g) < 0.5
        pred = net(_d4(x_all[idx], k, flip), a_all[idx], b_all[idx])
        loss = _weighted_mean(F.smooth_l1_loss(pred, t_all[idx], reduction="none"), w_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def forecast_change(net: ResponseForecaster, images: np.ndarray, labels: np.ndarray, stage_a: np.ndarray,
                    stage_b: np.ndarray, recipe: ForecastRecipe, batch_size: int = 128) -> np.ndarray:
    """Predicted density change a -> b per visit row (density units)."""
    x = _pair_inputs(images, labels)
    a, b = torch.as_tensor(np.asarray(stage_a, np.int64)), torch.as_tensor(np.asarray(stage_b, np.int64))
    views = [(k, f) for k in range(4) for f in (False, True)] if recipe.tta else [(0, False)]

    def predict(xb, ab, bb):  # the mean over the dihedral views the forecaster was trained on
        n = len(xb)
        return torch.stack([net(_d4(xb, torch.full((n,), k), torch.full((n,), f)), ab, bb) for k, f in views]).mean(0)

    out = [predict(x[i:i + batch_size], a[i:i + batch_size], b[i:i + batch_size])
           for i in range(0, len(x), batch_size)]
    return (torch.cat(out).numpy() / recipe.density_scale) if out else np.zeros(0, np.float32)
