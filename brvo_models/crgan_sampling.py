"""Sampling from a trained CRGAN: images of a patient at chosen stages, held-out predictions and their
scores, and the discriminator's realism of any image.

Everything runs batched, without gradients, in eval mode. A sample is a function of its seed
alone (:func:`brvo_models.crgan_data.draw_noise`), so it is the same on every device, alone or
batched, and for any subset of the requested stages; seed None is the zero-noise sample, the
model's point estimate (what the held-out score uses). Loading the networks from a checkpoint is
the model's own job (:func:`brvo_models.crgan.load_generator`, ``load_discriminator``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from brvo_models.crgan_data import N_STAGES, PatientSequence, draw_noise, resolve_seeds, to_model, to_uint8
from brvo_models import batched_metrics
from brvo_models.metrics import image_scores, mean_scores
from brvo_models.runtime import autocast, resolve_device

if TYPE_CHECKING:  # the networks import this module (validation), so only for annotations
    from brvo_models.crgan import CRGANDiscriminator, CRGANGenerator


def context_from_images(context_images: dict[int, np.ndarray], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """dict stage -> uint8 (n, H, W) -> (context (6, H, W) float32 in [0, 1]: each stage's mean image,
    counts (6,) float32: its number of images, 0 for a missing stage): what the generator reads."""
    context = np.zeros((N_STAGES, image_size, image_size), np.float32)
    counts = np.zeros(N_STAGES, np.float32)
    for s, imgs in context_images.items():
        s = int(s)
        if not 0 <= s < N_STAGES:
            raise ValueError(f"stage {s} outside 0..{N_STAGES - 1}")
        imgs = np.asarray(imgs)
        if imgs.ndim == 2:
            imgs = imgs[None]
        if imgs.shape[0] == 0:
            continue
        if imgs.shape[1:] != (image_size, image_size):
            raise ValueError(f"context images of stage {s} have shape {imgs.shape[1:]}, model needs {image_size}px")
        context[s] = imgs.astype(np.float32).mean(0) / 255.0
        counts[s] = len(imgs)
    return context, counts


@torch.no_grad()
def generate_batch(generator: CRGANGenerator, contexts: np.ndarray, counts: np.ndarray,
                   patients: Sequence[int | None], stages: Sequence[Sequence[int]], seeds: Sequence[int | None],
                   device: torch.device | str, chunk: int = 64) -> list[torch.Tensor]:
    """Core batched sampler. Per sequence i: context (6,H,W) in [0,1], counts (6,) (0 = missing
    stage), patient index or None, the stages to decode and a seed (None: the zero-noise sample,
    i.e. the model's point estimate). Returns per sequence a tensor (len(stages_i), H, W) in [-1, 1]."""
    device = resolve_device(device)
    generator.eval()
    H = generator.image_size
    out: list[torch.Tensor] = []
    for start in range(0, len(seeds), chunk):
        idx = list(range(start, min(start + chunk, len(seeds))))
        zs, pixs, sel_b, sel_t = [], [], [], []
        for j, i in enumerate(idx):
            if seeds[i] is None:
                z, pix = torch.zeros(generator.config.z_dim), torch.zeros(N_STAGES, 2, H, H)
            else:
                z, pix = draw_noise(seeds[i], generator.config.z_dim, H)
            zs.append(z)
            pixs.append(pix[list(stages[i])])
            sel_b += [j] * len(stages[i])
            sel_t += list(stages[i])
        pat = torch.tensor([generator.unknown_index if patients[i] is None else int(patients[i]) for i in idx])
        ctx = to_model(contexts[idx])[:, :, None]
        cnt = torch.as_tensor(np.asarray(counts)[idx], dtype=torch.float32)
        with autocast(device):
            imgs = generator(ctx.to(device), (cnt > 0).to(device), pat.to(device), torch.stack(zs).to(device),
                             torch.cat(pixs).to(device), torch.tensor(sel_b, device=device),
                             torch.tensor(sel_t, device=device), counts=cnt.to(device))
        imgs = imgs.float()[:, 0].cpu()
        pos = 0
        for i in idx:
            n = len(stages[i])
            out.append(imgs[pos:pos + n])
            pos += n
    return out


def generate(generator: CRGANGenerator, context_images: dict[int, np.ndarray], patient_index: int | None,
             stages: Sequence[int], k: int, seeds: int | Sequence[int] | Sequence[Sequence[int]],
             device: torch.device | str = "auto") -> np.ndarray:
    """K samples of one patient at each of ``stages``: uint8 (len(stages), k, H, W).

    ``context_images``: stage -> that stage's real images uint8 (n, H, W); each stage
    enters as the mean of its images, stages not given are missing. ``patient_index``:
    the embedding row of a training patient (``load_generator``'s mapping), None for
    a patient not seen in training. ``seeds``: a base int (sample j uses base + j for
    all stages), k ints (one per sample, shared by the stages), or len(stages) lists
    of k ints (one seed per image). Same seeds -> same images; batched, no grad.
    """
    stages = [int(s) for s in stages]
    H = generator.image_size
    ctx, cnt = context_from_images(context_images, H)
    if isinstance(seeds, (list, tuple)) and seeds and isinstance(seeds[0], (list, tuple, np.ndarray)):
        if len(seeds) != len(stages) or any(len(row) != k for row in seeds):
            raise ValueError(f"per-image seeds must be {len(stages)} lists of {k}")
        flat = [(si, int(sd)) for si in range(len(stages)) for sd in seeds[si]]
        res = generate_batch(generator, np.repeat(ctx[None], len(flat), 0), np.repeat(cnt[None], len(flat), 0),
                             [patient_index] * len(flat), [[stages[si]] for si, _ in flat],
                             [sd for _, sd in flat], device)
        out = torch.stack([r[0] for r in res]).view(len(stages), k, H, H) if res else torch.zeros(len(stages), k, H, H)
        return to_uint8(out)
    seeds = resolve_seeds(seeds, k)
    res = generate_batch(generator, np.repeat(ctx[None], k, 0), np.repeat(cnt[None], k, 0),
                         [patient_index] * k, [stages] * k, seeds, device)
    out = torch.stack(res, dim=1) if res else torch.zeros(len(stages), 0, H, H)
    return to_uint8(out)


@torch.no_grad()
def realism(discriminator: CRGANDiscriminator, images: np.ndarray, stages: Sequence[int],
            patient_indices: Sequence[int | None] | None, device: torch.device | str = "cpu",
            batch_size: int = 64) -> np.ndarray:
    """Discriminator realism of uint8 images (N, H, W): mean sigmoid of the patch logits, float32 (N,).

    ``stages`` (N,) ints; ``patient_indices`` embedding rows or None (unknown patient) per image."""
    device = resolve_device(device)
    discriminator.eval()
    images = np.asarray(images)
    n = len(images)
    if patient_indices is None:
        patient_indices = [None] * n
    pats = torch.tensor([discriminator.unknown_index if p is None else int(p) for p in patient_indices])
    st = torch.as_tensor(np.array(stages, np.int64))  # a copy: callers may pass read-only views
    out = []
    for i in range(0, n, batch_size):
        x = to_model(images[i:i + batch_size].astype(np.float32) / 255.0)[:, None].to(device)
        with autocast(device):
            logits = discriminator(x, st[i:i + batch_size].to(device), pats[i:i + batch_size].to(device))
        out.append(torch.sigmoid(logits.float()).mean(dim=(1, 2, 3)).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def predict_heldout(generator: CRGANGenerator, cases: Sequence[tuple[PatientSequence, int]],
                    seeds: Sequence[int | None] = (None,), device="cpu") -> np.ndarray:
    """For each (patient, stage) case: hide the stage and generate it from the patient's other stages.

    Returns float [0, 1] images (len(cases), len(seeds), H, W): one per seed (None = the zero-noise
    sample, the model's point estimate). The hidden stage is not in the context at all.
    """
    H = generator.image_size
    ctxs, cnts, pats, stages, flat_seeds = [], [], [], [], []
    for seq, s in cases:
        ctx, cnt = context_from_images({o: seq.images[o] for o in seq.observed if o != s}, H)
        for sd in seeds:
            ctxs.append(ctx)
            cnts.append(cnt)
            pats.append(seq.index)
            stages.append([s])
            flat_seeds.append(sd)
    if not ctxs:
        return np.zeros((0, len(seeds), H, H), np.float32)
    res = generate_batch(generator, np.stack(ctxs), np.stack(cnts), pats, stages, flat_seeds, device)
    out = (torch.stack([r[0] for r in res]).clamp(-1, 1) + 1) / 2
    return out.numpy().reshape(len(cases), len(seeds), H, H)


def case_scores(pred: np.ndarray, real_images: np.ndarray) -> dict[str, float]:
    """Metrics of one prediction (float [0,1]) against EACH real image (uint8) of the stage, averaged."""
    rows = [image_scores(pred, r.astype(np.float64) / 255.0) for r in real_images]
    m = mean_scores(rows)
    m.pop("n", None)
    return m



def score_cases(preds: Sequence[np.ndarray], real_stacks: Sequence[np.ndarray],
                device: torch.device | str | None = None) -> list[dict[str, float]]:
    """``[case_scores(p, r) for p, r in zip(preds, real_stacks)]``; with a ``device``, computed there in
    batches (:func:`brvo_models.batched_metrics.paired_scores`; agrees with the numpy path to 1e-4).

    Predictions that share a real stack (the same array object: a case's estimate, its samples and
    its baselines) share its copy on the device.
    """
    if len(preds) != len(real_stacks):
        raise ValueError(f"{len(preds)} predictions for {len(real_stacks)} real stacks")
    if device is None:
        return [case_scores(p, r) for p, r in zip(preds, real_stacks)]
    if not preds:
        return []
    slot: dict[int, int] = {}
    stacks: list[np.ndarray] = []
    for r in real_stacks:
        if id(r) not in slot:
            slot[id(r)] = sum(len(x) for x in stacks)
            stacks.append(np.asarray(r))
    reals = np.concatenate(stacks)
    index_a = np.concatenate([np.full(len(r), i) for i, r in enumerate(real_stacks)])
    index_b = np.concatenate([slot[id(r)] + np.arange(len(r)) for r in real_stacks])
    pool_a = np.stack([np.asarray(p, np.float64) for p in preds])
    scores = batched_metrics.paired_scores(pool_a, reals, index_a, index_b, device=device)
    out, start = [], 0
    for r in real_stacks:
        stop = start + len(r)
        out.append({m: float(np.mean(v[start:stop])) for m, v in scores.items()})
        start = stop
    return out
