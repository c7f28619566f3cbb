"""A plain supervised vessel segmenter: the third label baseline, and the usefulness experiment's model.

Why it exists: Pix2Pix's generator is a U-Net trained with supervision plus an adversarial
term. A labeller a researcher trusts must at least match what a minute of ordinary supervised
training gives on the same rows, so this module trains exactly that, at the same resolution:

* ``arch="dilated"`` (the baseline): five 3x3 convolutions of ``width`` (8) channels, the 2nd
  and 3rd dilated (2, 4), ReLU between them; receptive field 19 px. About 2,000 weights.
* ``arch="dilated_bn"``: the usefulness protocol's downstream model (tasks/usefulness.py): five 3x3
  convolutions of ``width`` channels, dilations 1, 2, 4, 8, 1, each followed by batch norm and ReLU,
  then a 1x1 head; receptive field 33 px, full resolution throughout (no pooling loses a one-pixel
  vessel). Batch norm is why it is there: on the 53-patient phantom's validation patients the
  plain ``dilated`` net at lr 3e-3 still predicted every pixel a vessel (val Dice 0.23) after 1,000
  steps, a budget the protocol (many arms x seeds) cannot exceed, where this one learns in hundreds.
* ``arch="unet"``: the Pix2Pix U-Net (no adversary, no dropout, batch norm, ``width`` = ngf),
  kept for the usefulness experiment (tasks/usefulness.py).

Training: BCE + soft Dice (:func:`brvo_models.losses.soft_dice_loss`), Adam (lr 3e-3: on the
validation patients of two 64 px phantoms it reached val Dice 0.70 within 3,000 steps, where lr 1e-3
was still at 0.68 and climbing, so the baseline is not undertrained at that budget), a fixed budget
of ``steps`` optimiser steps on batches sampled with replacement from a seeded generator and
augmented with the same aligned flips and rotations Pix2Pix uses
(:func:`brvo_models.pix2pix.aligned_augment`). With validation images, the weights are
scored every ``val_every`` steps and the best ones kept (the same rule as Pix2Pix's best.pt),
and the labelling threshold is chosen on the validation patients from the grid Pix2Pix uses;
it travels with the weights in the ``label_threshold`` buffer. On CPU a seed gives the same
weights every time (fp32 unless ``precision='bf16'`` is asked for, no dropout, one RNG stream).

Plain functions, no Prefect; 'auto' picks CUDA when present.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brvo_models.flips import flip_averaged
from brvo_models.metrics import choose_threshold, label_scores, mean_scores
from brvo_models.losses import soft_dice_loss
from brvo_models.pix2pix import UnetGenerator, aligned_augment, init_weights, num_downs_for
from brvo_models.runtime import autocast, select_device

Arch = Literal["dilated", "dilated_bn", "unet"]

#: Dilation of each of the five 3x3 convolutions of the baseline (two dilated).
DILATIONS = (1, 2, 4, 1, 1)
#: Dilations of the batch-normalised variant (receptive field 33 px).
BN_DILATIONS = (1, 2, 4, 8, 1)
#: Archs whose net returns logits (the U-Net returns tanh output in [-1, 1]).
LOGIT_ARCHS = ("dilated", "dilated_bn")


class DilatedCNN(nn.Module):
    """Five 3x3 convolutions (dilations :data:`DILATIONS`), ReLU between; returns vessel logits."""

    def __init__(self, width: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i, d in enumerate(DILATIONS):
            out = 1 if i == len(DILATIONS) - 1 else width
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=d, dilation=d))
            if out != 1:
                layers.append(nn.ReLU(inplace=True))
            channels = out
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DilatedBNCNN(nn.Module):
    """Five 3x3 conv + batch norm + ReLU blocks (dilations :data:`BN_DILATIONS`), a 1x1 head; vessel logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for d in BN_DILATIONS:
            layers += [nn.Conv2d(channels, width, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def output_loss(out: torch.Tensor, y: torch.Tensor, arch: str) -> torch.Tensor:
    """BCE + soft Dice of a net's raw output against 0/1 labels ``y`` (logits, or tanh output for the U-Net)."""
    out = out.float()
    if arch in LOGIT_ARCHS:
        p = torch.sigmoid(out)
        bce = F.binary_cross_entropy_with_logits(out, y)
    else:
        p = ((out + 1.0) * 0.5).clamp(1e-5, 1 - 1e-5)
        bce = F.binary_cross_entropy(p, y)
    return bce + soft_dice_loss(p, y)  # probabilities in [0, 1] and 0/1 labels (brvo_models.losses)


class VesselSegmenter(nn.Module):
    """Image in [-1, 1] (B, 1, H, W) -> vessel probability in [0, 1]; threshold stored as a buffer."""

    def __init__(self, arch: Arch = "dilated", image_size: int = 64, width: int = 8):
        super().__init__()
        if arch == "dilated":
            self.net: nn.Module = DilatedCNN(width)
        elif arch == "dilated_bn":
            self.net = DilatedBNCNN(width)
        elif arch == "unet":
            self.net = init_weights(UnetGenerator(1, 1, num_downs_for(image_size), width, "batch", use_dropout=False))
        else:
            raise ValueError(f"unknown segmenter arch {arch!r}; choose 'dilated', 'dilated_bn' or 'unet'")
        self.arch = arch
        self.register_buffer("label_threshold", torch.tensor(0.5))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x).float()
        return torch.sigmoid(out) if self.arch in LOGIT_ARCHS else (out + 1.0) * 0.5

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE + soft Dice against 0/1 labels ``y``; BCE on logits where the net has them (stabler)."""
        return output_loss(self.net(x), y, self.arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(x)


@dataclass
class SegmenterFit:
    """A trained segmenter and how it got there (``history``: one row per validation)."""

    net: VesselSegmenter
    steps: int
    best_step: int
    best_val_dice: float
    threshold: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _as_input(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got shape {images.shape}")
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]


def predict_probabilities(net: VesselSegmenter, images: np.ndarray, batch_size: int = 64,
                          flip_average: bool = False, precision: str | None = None) -> np.ndarray:
    """Vessel probabilities float32 (N, H, W) of uint8 images (N, H, W); eval mode, no grad.

    ``flip_average``: the mean over the four flips of each image (:func:`brvo_models.flips.flip_averaged`),
    as Pix2Pix labels with ``flip_average`` on; off for the plain baseline."""
    x_all = _as_input(images)
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = np.zeros(x_all.shape[:1] + x_all.shape[2:], np.float32)
    try:
        with torch.no_grad():
            for start in range(0, len(x_all), batch_size):
                x = x_all[start:start + batch_size].to(dev) * 2 - 1
                with autocast(dev, precision):
                    p = flip_averaged(net.probabilities, x) if flip_average else net.probabilities(x)
                out[start:start + batch_size] = p.float()[:, 0].cpu().numpy()
    finally:
        net.train(was_training)
    return out


def random_windows(x: torch.Tensor, y: torch.Tensor, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size`` x ``size`` window of each (image, label) pair, one window per pair."""
    offsets = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0], 2), generator=g).tolist()
    xs = torch.stack([x[i, :, r:r + size, c:c + size] for i, (r, c) in enumerate(offsets)])
    ys = torch.stack([y[i, :, r:r + size, c:c + size] for i, (r, c) in enumerate(offsets)])
    return xs, ys


def fit_segmenter(images: np.ndarray, labels: np.ndarray, *, image_size: int, steps: int,
                  val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                  val_every: int | None = None, arch: Arch = "dilated", width: int = 8, batch_size: int = 8,
                  lr: float = 3e-3, seed: int = 0, device: str | torch.device = "auto",
                  row_weights: np.ndarray | None = None, crop: int | None = None,
                  precision: str | None = None) -> SegmenterFit:
    """Train for exactly ``steps`` optimiser steps; with val images keep the best-on-val weights.

    ``images`` uint8 (N, H, W) of side ``image_size``, ``labels`` 0/1 of the same shape.
    Validation (every ``val_every`` steps, default ``steps // 20``, and after the last step)
    chooses both the kept weights and the threshold; without it the last weights and 0.5 are used.
    ``row_weights`` (N,), non-negative: a row is drawn into a batch with probability proportional to
    its weight, which in expectation is a loss weight (how the usefulness protocol down-weights
    synthetic rows); None draws uniformly (the same batches as before the option existed).
    ``crop``: train on a random ``crop`` x ``crop`` window of each augmented pair (the dilated nets are fully
    convolutional, so they still segment whole images; a quarter of the pixels makes a step about four times
    cheaper on a CPU); None trains on whole images. ``precision``: 'auto', 'fp32' or 'bf16' autocast
    (brvo_models.runtime; None: the surrounding :func:`~brvo_models.runtime.precision_scope`'s).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    images, labels, row_weights = _check_rows(images, labels, image_size, row_weights)
    has_val = val_images is not None and len(val_images) > 0
    val_every = max(1, steps // 20) if val_every is None else max(1, int(val_every))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dev = device if isinstance(device, torch.device) else select_device(str(device))
    net = VesselSegmenter(arch, image_size, width).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999))
    x_all = _as_input(images)
    y_all = torch.from_numpy(labels.astype(np.float32))[:, None]
    g = torch.Generator().manual_seed(seed)
    draw_p = None if row_weights is None else torch.as_tensor(row_weights / row_weights.sum())
    history: list[dict[str, float]] = []
    best = {"step": 0, "dice": float("-inf"), "threshold": 0.5, "state": None}
    net.train()
    for step in range(1, steps + 1):
        if draw_p is None:
            idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        else:
            idx = torch.multinomial(draw_p, batch_size, replacement=True, generator=g)
        x, y = aligned_augment(x_all[idx], y_all[idx], g)
        if crop is not None and crop < image_size:
            x, y = random_windows(x, y, crop, g)
        x, y = x.to(dev) * 2 - 1, y.to(dev)
        with autocast(dev, precision):
            loss = net.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if has_val and (step % val_every == 0 or step == steps):
            threshold, val_dice = choose_threshold(predict_probabilities(net, val_images, precision=precision),
                                                   val_labels)
            history.append({"step": step, "loss": float(loss.item()), "val_dice": val_dice, "threshold": threshold})
            if val_dice > best["dice"]:
                best = {"step": step, "dice": val_dice, "threshold": threshold,
                        "state": copy.deepcopy(net.state_dict())}
    if best["state"] is not None:
        net.load_state_dict(best["state"])
        net.label_threshold.fill_(best["threshold"])
    else:
        best = {"step": steps, "dice": float("nan"), "threshold": 0.5}
    return SegmenterFit(net=net.eval(), steps=steps, best_step=int(best["step"]), best_val_dice=float(best["dice"]),
                        threshold=float(best["threshold"]), seconds=time.perf_counter() - t0, history=history)


def train_segmenter(images: np.ndarray, labels: np.ndarray, *, image_size: int, steps: int, seed: int = 0,
                    device: str | torch.device = "auto", **options) -> VesselSegmenter:
    """The trained net of :func:`fit_segmenter` (same arguments), in eval mode."""
    return fit_segmenter(images, labels, image_size=image_size, steps=steps, seed=seed, device=device,
                         **options).net


def evaluate_segmenter(net: VesselSegmenter, images: np.ndarray, labels: np.ndarray,
                       threshold: float | None = None) -> dict:
    """Mean Dice, IoU and clDice (and n) over uint8 images (N, H, W) against 0/1 labels.

    ``threshold=None`` uses the one stored with the net (chosen on validation patients, else 0.5).
    """
    threshold = float(net.label_threshold) if threshold is None else float(threshold)
    probs = predict_probabilities(net, images)
    return mean_scores([label_scores(p > threshold, t) for p, t in zip(probs, np.asarray(labels))])


# ------------------------------------------------------------------------------ seeds as one batched net


class SeedGroupedNet(nn.Module):
    """S dilated segmenter nets of one arch side by side as the channel groups of one net.

    Why: the usefulness protocol trains one recipe under S seeds; one call per layer for all of them saves
    the per-call overhead of S (on a CPU little, about 10 %, the step being compute-bound; more where small
    nets are launch-bound, as on a GPU). A convolution with ``groups=S`` computes every seed's convolution on
    its own channel group in one call; batch norm normalises each channel over (batch, H, W), so each
    seed's channels see exactly its own batch's statistics and keep their own running stats. Seed s's
    output (channel s) depends only on seed s's input (channel s) and weights, so the gradient of the
    summed loss with respect to seed s's weights is that of seed s's loss alone, and Adam, elementwise,
    updates each seed's slice as it would alone. (vmap over stacked modules does the same arithmetic
    through a convolution batching rule, slower on a CPU: benchmarks/usefulness_batching.py, docs/performance.md.)
    """

    def __init__(self, nets: list[VesselSegmenter]):
        super().__init__()
        if not nets or any(n.arch != nets[0].arch for n in nets) or nets[0].arch not in LOGIT_ARCHS:
            raise ValueError(f"SeedGroupedNet needs one or more nets of one of {LOGIT_ARCHS}")
        self.arch, self.seeds = nets[0].arch, len(nets)
        bodies = [n.net.body for n in nets]
        layers: list[nn.Module] = []
        with torch.no_grad():
            for i, layer in enumerate(bodies[0]):
                if isinstance(layer, nn.Conv2d):
                    grouped: nn.Module = nn.Conv2d(
                        layer.in_channels * self.seeds, layer.out_channels * self.seeds, layer.kernel_size,
                        padding=layer.padding, dilation=layer.dilation, groups=self.seeds, bias=layer.bias is not None)
                elif isinstance(layer, nn.BatchNorm2d):
                    grouped = nn.BatchNorm2d(layer.num_features * self.seeds, eps=layer.eps, momentum=layer.momentum)
                elif isinstance(layer, nn.ReLU):
                    grouped = nn.ReLU(inplace=layer.inplace)
                else:
                    raise ValueError(f"SeedGroupedNet cannot group a {type(layer).__name__}")
                for name, tensor in grouped.state_dict().items():
                    parts = [b[i].state_dict()[name] for b in bodies]
                    tensor.copy_(parts[0] if name == "num_batches_tracked" else torch.cat(parts))
                layers.append(grouped)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W): seed s's input in channel s -> (B, S, H, W) logits, seed s's in channel s."""
        return self.body(x)

    def seed_state(self, seed_index: int) -> dict[str, torch.Tensor]:
        """Seed ``seed_index``'s weights and running stats as a :class:`VesselSegmenter` state_dict (copies)."""
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.body):
            for name, tensor in layer.state_dict().items():
                part = tensor if name == "num_batches_tracked" else tensor.chunk(self.seeds)[seed_index]
                out[f"net.body.{i}.{name}"] = part.detach().clone()
        return out


def predict_probabilities_grouped(net: SeedGroupedNet, images: np.ndarray, batch_size: int = 64,
                                  precision: str | None = None) -> np.ndarray:
    """Every seed's vessel probabilities float32 (S, N, H, W) of uint8 images (N, H, W); eval mode, no grad."""
    x_all = _as_input(images)
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = np.zeros((net.seeds,) + x_all.shape[:1] + x_all.shape[2:], np.float32)
    try:
        with torch.no_grad():
            for start in range(0, len(x_all), batch_size):
                x = (x_all[start:start + batch_size].to(dev) * 2 - 1).expand(-1, net.seeds, -1, -1)
                with autocast(dev, precision):
                    p = torch.sigmoid(net(x).float())
                out[:, start:start + batch_size] = p.permute(1, 0, 2, 3).cpu().numpy()
    finally:
        net.train(was_training)
    return out


def _check_rows(images: np.ndarray, labels: np.ndarray, image_size: int,
                row_weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) == 0 or images.shape != labels.shape or images.shape[1:] != (image_size, image_size):
        raise ValueError(f"need non-empty images and labels of shape (N, {image_size}, {image_size}); "
                         f"got {images.shape} and {labels.shape}")
    if row_weights is not None:
        row_weights = np.asarray(row_weights, np.float64)
        if row_weights.shape != (len(images),) or not np.isfinite(row_weights).all() or (row_weights < 0).any() \
                or row_weights.sum() <= 0:
            raise ValueError(f"row_weights must be {len(images)} finite non-negative numbers, not all zero")
    return images, labels, row_weights


def fit_segmenter_seeds(images: list[np.ndarray], labels: list[np.ndarray], *, seeds: list[int], image_size: int,
                        steps: int, val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                        val_every: int | None = None, arch: Arch = "dilated", width: int = 8, batch_size: int = 8,
                        lr: float = 3e-3, device: str | torch.device = "auto",
                        row_weights: list[np.ndarray | None] | None = None,
                        crop: int | None = None, precision: str | None = None) -> list[SegmenterFit]:
    """:func:`fit_segmenter` for several seeds at once: one :class:`SegmenterFit` per seed, the same (within
    float rounding) as ``fit_segmenter(images[i], labels[i], seed=seeds[i], row_weights=row_weights[i], ...)``.

    Each seed keeps its own rows, initial weights (drawn after ``torch.manual_seed(seed)``, as alone), batch
    generator, augmentation, crops, best-on-val weights and threshold; only the arithmetic is shared, in one
    :class:`SeedGroupedNet`. The U-Net arch is not grouped: it trains seed by seed. ``seconds`` of each fit
    is the batch's wall time divided by the number of seeds.
    """
    n = len(seeds)
    row_weights = [None] * n if row_weights is None else list(row_weights)
    if n == 0 or len(images) != n or len(labels) != n or len(row_weights) != n:
        raise ValueError(f"need one images, labels (and row_weights) entry per seed: {n} seeds, "
                         f"{len(images)} images, {len(labels)} labels, {len(row_weights)} row_weights")
    options = dict(image_size=image_size, steps=steps, val_images=val_images, val_labels=val_labels,
                   val_every=val_every, arch=arch, width=width, batch_size=batch_size, lr=lr, device=device, crop=crop,
                   precision=precision)
    if arch not in LOGIT_ARCHS:
        return [fit_segmenter(x, y, seed=s, row_weights=w, **options)
                for x, y, s, w in zip(images, labels, seeds, row_weights)]
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rows = [_check_rows(x, y, image_size, w) for x, y, w in zip(images, labels, row_weights)]
    has_val = val_images is not None and len(val_images) > 0
    val_every = max(1, steps // 20) if val_every is None else max(1, int(val_every))
    t0 = time.perf_counter()
    dev = device if isinstance(device, torch.device) else select_device(str(device))
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(VesselSegmenter(arch, image_size, width).to(dev))
    grouped = SeedGroupedNet(nets).to(dev, memory_format=torch.channels_last)  # about 1.1x faster on a CPU
    opt = torch.optim.Adam(grouped.parameters(), lr=lr, betas=(0.9, 0.999))
    x_all = [_as_input(x) for x, _, _ in rows]
    y_all = [torch.from_numpy(y.astype(np.float32))[:, None] for _, y, _ in rows]
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    draw_p = [None if w is None else torch.as_tensor(w / w.sum()) for _, _, w in rows]
    history: list[list[dict[str, float]]] = [[] for _ in seeds]
    best = [{"step": 0, "dice": float("-inf"), "threshold": 0.5, "state": None} for _ in seeds]
    grouped.train()
    for step in range(1, steps + 1):
        xs, ys = [], []
        for i, g in enumerate(gens):
            if draw_p[i] is None:
                idx = torch.randint(0, len(x_all[i]), (batch_size,), generator=g)
            else:
                idx = torch.multinomial(draw_p[i], batch_size, replacement=True, generator=g)
            x, y = aligned_augment(x_all[i][idx], y_all[i][idx], g)
            if crop is not None and crop < image_size:
                x, y = random_windows(x, y, crop, g)
            xs.append(x)
            ys.append(y)
        x = (torch.cat(xs, 1).to(dev) * 2 - 1).contiguous(memory_format=torch.channels_last)
        y = torch.cat(ys, 1).to(dev)
        with autocast(dev, precision):
            out = grouped(x)
            losses = torch.stack([output_loss(out[:, i:i + 1], y[:, i:i + 1], arch) for i in range(n)])
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        if has_val and (step % val_every == 0 or step == steps):
            probs = predict_probabilities_grouped(grouped, val_images, precision=precision)
            step_losses = losses.detach().tolist()
            for i in range(n):
                threshold, val_dice = choose_threshold(probs[i], val_labels)
                history[i].append({"step": step, "loss": float(step_losses[i]), "val_dice": val_dice,
                                   "threshold": threshold})
                if val_dice > best[i]["dice"]:
                    best[i] = {"step": step, "dice": val_dice, "threshold": threshold,
                               "state": grouped.seed_state(i)}
    seconds = (time.perf_counter() - t0) / n
    fits = []
    for i, net in enumerate(nets):
        chosen = best[i]
        if chosen["state"] is not None:
            net.load_state_dict({**chosen["state"], "label_threshold": torch.tensor(chosen["threshold"])})
        else:
            net.load_state_dict({**grouped.seed_state(i), "label_threshold": torch.tensor(0.5)})
            chosen = {"step": steps, "dice": float("nan"), "threshold": 0.5}
        fits.append(SegmenterFit(net=net.eval(), steps=steps, best_step=int(chosen["step"]),
                                 best_val_dice=float(chosen["dice"]), threshold=float(chosen["threshold"]),
                                 seconds=seconds, history=history[i]))
    return fits
