"""CRGAN's data: a patient's real images per treatment stage, the training batches cut from them,
the held-out cases, and the noise a sample is drawn from.

Everything here is a pure function of its inputs and seeds (numpy / torch generators
seeded explicitly), so an epoch's batches and a sample's noise are the same on every
run and device: what exact resume and reproducible samples rest on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from brvo_models.configs import CRGANConfig
from brvo_models.runtime import to_model_range

N_STAGES = 6  # s1t1 < s1t2 < s2t1 < s2t2 < s3t1 < s3t2


@dataclass
class PatientSequence:
    """One patient's real images per stage (uint8 (n, H, W) or None where the stage is missing)."""

    patient_id: str
    split: str
    images: list[np.ndarray | None]
    index: int | None = None  # embedding index for training patients, None = unknown patient
    _means: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def observed(self) -> list[int]:
        return [s for s in range(N_STAGES) if self.images[s] is not None and len(self.images[s]) > 0]

    def stage_mean(self, stage: int) -> np.ndarray:
        """Mean of the stage's real images as float32 in [0, 1] (read-only).

        Computed once per stage and kept: every training batch needs it (targets, full contexts),
        and recomputing it was most of the time spent building a batch at 256 px.
        """
        mean = self._means.get(stage)
        if mean is None:
            mean = self.images[stage].astype(np.float32).mean(axis=0) / 255.0
            mean.flags.writeable = False
            self._means[stage] = mean
        return mean


def sequences_from_arrays(images: np.ndarray, meta) -> list[PatientSequence]:
    """Group real rows (meta: DataFrame with patient_id, stage, split[, is_synthetic]) into sequences."""
    keep = np.ones(len(meta), bool)
    if "is_synthetic" in meta:
        keep &= ~np.asarray(meta["is_synthetic"], bool)
    seqs = []
    for pid, group in meta[keep].groupby("patient_id", sort=True):
        per_stage: list[np.ndarray | None] = [None] * N_STAGES
        for stage, rows in group.groupby("stage"):
            per_stage[int(stage)] = images[rows.index.to_numpy()]
        seqs.append(PatientSequence(str(pid), str(group["split"].iloc[0]), per_stage))
    return seqs


def to_model(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] float (array or tensor) -> [-1, 1] float32 tensor."""
    return to_model_range(torch.as_tensor(x, dtype=torch.float32))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensor -> uint8 array."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()


def pixel_noise(n: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, H, W) on the generator's device: white noise per pixel, and one value per row broadcast
    along it (scan lines)."""
    dev = generator.device
    white = torch.randn(n, 1, image_size, image_size, generator=generator, device=dev)
    rows = torch.randn(n, 1, image_size, 1, generator=generator, device=dev).expand(-1, -1, -1, image_size)
    return torch.cat([white, rows], dim=1)


def draw_noise(seed: int, z_dim: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of one sample: z (z_dim,) and pixel noise for all six stages (6, 2, H, W).

    Drawn on the CPU from a generator seeded by ``seed`` alone, so a sample is the same
    on every device and for every subset of requested stages.
    """
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    z = torch.randn(z_dim, generator=g)
    pix = pixel_noise(N_STAGES, image_size, g)
    return z, pix


def resolve_seeds(seeds: int | Sequence[int], k: int) -> list[int]:
    """A base seed -> [base, base+1, ..., base+k-1]; a list is checked for length k."""
    if isinstance(seeds, (int, np.integer)):
        return [int(seeds) + i for i in range(k)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for k={k} samples")
    return seeds


# ------------------------------------------------------------------------------------ training batches


def make_train_batches(seqs: list[PatientSequence], config: CRGANConfig, seed: int, epoch: int) -> list[dict]:
    """One epoch of training batches, fully determined by (seed, epoch).

    Each sequence appears ``config.repeats`` times per epoch in shuffled batches. Per
    sequence: a whole-sequence random flip (augment), hide observed stages (:func:`hidden_stages`:
    a suffix, or each with ``hide_prob``; at least one stays visible), context = mean of a random non-empty
    subset of each visible stage's images, targets = every observed stage (L1 to its
    mean image, D's real = one of its images), patient index dropped to 'unknown'
    with ``unknown_patient_prob`` so unseen patients are served by the context alone.
    """
    rng = np.random.default_rng([seed, epoch, 7771])
    order = np.concatenate([rng.permutation(len(seqs)) for _ in range(config.repeats)])
    batches = []
    for start in range(0, len(order), config.batch_size):
        chunk = [seqs[i] for i in order[start:start + config.batch_size]]
        batches.append(_train_batch(chunk, config, rng))
    return batches


def _train_batch(chunk: list[PatientSequence], config: CRGANConfig, rng: np.random.Generator) -> dict:
    H = chunk[0].images[chunk[0].observed[0]].shape[-1]
    B = len(chunk)
    context = np.zeros((B, N_STAGES, H, H), np.float32)
    visible = np.zeros((B, N_STAGES), bool)
    counts = np.zeros((B, N_STAGES), np.float32)
    patient = np.zeros(B, np.int64)
    sel_b, sel_t, hidden, targets, reals = [], [], [], [], []
    for b, seq in enumerate(chunk):
        obs = seq.observed
        hide = hidden_stages(len(obs), config, rng)
        flip_h, flip_v = (rng.random(2) < 0.5) if config.augment else (False, False)

        def aug(a: np.ndarray) -> np.ndarray:
            if flip_h:
                a = a[..., :, ::-1]
            if flip_v:
                a = a[..., ::-1, :]
            return a

        unknown = seq.index is None or rng.random() < config.unknown_patient_prob
        patient[b] = -1 if unknown else seq.index
        for s, h in zip(obs, hide):
            imgs = seq.images[s]
            if not h:
                if rng.random() < config.context_subset_prob:
                    subset = np.sort(rng.choice(len(imgs), size=int(rng.integers(1, len(imgs) + 1)), replace=False))
                    context[b, s] = aug(imgs[subset].astype(np.float32).mean(0) / 255.0)
                else:  # all of them: the stage mean (the same bits as the mean of imgs[arange(n)])
                    subset = np.arange(len(imgs))
                    context[b, s] = aug(seq.stage_mean(s))
                visible[b, s] = True
                counts[b, s] = len(subset)
            sel_b.append(b)
            sel_t.append(s)
            hidden.append(bool(h))
            targets.append(aug(seq.stage_mean(s)))
            reals.append(aug(imgs[rng.integers(len(imgs))].astype(np.float32) / 255.0))
    return {
        "context": context, "visible": visible, "counts": counts, "patient": patient,
        "sel_b": np.asarray(sel_b, np.int64), "sel_t": np.asarray(sel_t, np.int64),
        "hidden": np.asarray(hidden, bool), "targets": np.stack(targets), "reals": np.stack(reals),
        "noise_seed": int(rng.integers(2**62)),
    }


def hidden_stages(n_observed: int, config: CRGANConfig, rng: np.random.Generator) -> np.ndarray:
    """Which of a sequence's observed stages (in stage order) a training step hides from the context.

    With ``config.hide_suffix_prob`` every stage after a random cut is hidden (1 to n-1 stay visible):
    the after-last-visit gap, the common one in SOUL, practised as it is used. Otherwise each stage is
    hidden with ``hide_prob``, one kept visible at random when all were drawn. One stage: nothing hidden.
    With ``hide_suffix_prob`` 0 no extra random number is drawn, so the batches are those of before.
    """
    if n_observed <= 1:
        return np.zeros(n_observed, bool)
    if config.hide_suffix_prob > 0 and rng.random() < config.hide_suffix_prob:
        keep = int(rng.integers(1, n_observed))  # visible prefix length, 1..n-1
        return np.arange(n_observed) >= keep
    hide = rng.random(n_observed) < config.hide_prob
    if hide.all():
        hide[rng.integers(n_observed)] = False
    return hide


def texture_amplitudes(seqs: Iterable[PatientSequence]) -> tuple[float, float]:
    """(speckle, scan-line) amplitudes on the [0, 1] scale that give the generator's texture the spread of
    real repeat scans around their stage mean, by moment matching.

    The texture adds ``speckle * m * white + lines * row`` to an estimate m (white: one N(0,1) per pixel;
    row: one per row). Residuals r = scan - stage mean of every stage with n >= 2 scans, scaled by
    sqrt(n / (n - 1)) (a mean of n scans removes 1/n of their variance): the residual minus its row mean
    has variance speckle^2 * m^2 (so speckle^2 = E[(r - row mean)^2] / E[m^2]); the row means have
    variance lines^2 + speckle^2 * E[m^2] / W. Raises ValueError when no stage has two scans.
    """
    within, within_m2, row_var, m2_over_w, n_images = 0.0, 0.0, 0.0, 0.0, 0
    for seq in seqs:
        for s in seq.observed:
            imgs = seq.images[s]
            n = len(imgs)
            if n < 2:
                continue
            mean = seq.stage_mean(s).astype(np.float64)
            r = (imgs.astype(np.float64) / 255.0 - mean) * np.sqrt(n / (n - 1))
            rows = r.mean(axis=2, keepdims=True)
            within += float(((r - rows) ** 2).mean(axis=(1, 2)).sum())
            within_m2 += float((mean ** 2).mean()) * n
            row_var += float((rows ** 2).mean(axis=(1, 2)).sum())
            m2_over_w += float((mean ** 2).mean()) / mean.shape[-1] * n
            n_images += n
    if n_images == 0:
        raise ValueError("no stage has two or more scans: the repeat-scan spread is unknown")
    speckle2 = within / within_m2
    lines2 = max(row_var / n_images - speckle2 * m2_over_w / n_images, 0.0)
    return float(np.sqrt(speckle2)), float(np.sqrt(lines2))


def heldout_cases(seqs: Iterable[PatientSequence]) -> list[tuple[PatientSequence, int]]:
    """(patient, stage) for every observed stage of a patient with at least one other observed stage."""
    return [(seq, s) for seq in seqs if len(seq.observed) > 1 for s in seq.observed]

