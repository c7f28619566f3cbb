"""CRGAN throughput: training sequences/s and generation images/s at 64 and 128 px.

Run on demand: ``python benchmarks/crgan_bench.py [--sizes 64 128] [--device cpu|cuda|auto]``.
Each figure comes with a baseline measured in the same run:

* training: the full step (generator + conditional PatchGAN discriminator, adversarial + L1
  + SSIM terms) against an L1-only step of the same generator (``lambda_adv=0``: no
  discriminator) -> the cost of the GAN part;
* generation: batched :func:`generate` (K samples x missing stages in one call) against the
  same images generated one per call -> the gain of batching.

Widths are the demo preset's (64 px) at every size, so the sizes are comparable. Synthetic
sequences (structured noise) stand in for patients; only speed is measured.

``--clock cpu`` times with the process CPU clock (use with ``--threads 1``): on a machine shared
with other jobs this measures the work itself, i.e. the rate on one dedicated core.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from brvo_models.crgan import CRGAN
from brvo_models.crgan_data import PatientSequence, make_train_batches
from brvo_models.crgan_sampling import generate
from brvo_models.runtime import select_device
from tasks.config import preset


def synthetic_sequences(n: int, size: int, seed: int = 0) -> list[PatientSequence]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    seqs = []
    for p in range(n):
        base = 0.5 + 0.3 * np.sin((xx * (3 + p % 5) + yy * (2 + p % 3)) * 6)
        images: list[np.ndarray | None] = []
        for s in range(6):
            if s > 0 and rng.random() < 0.4:
                images.append(None)
                continue
            k = int(rng.integers(1, 6))
            stack = np.clip(base[None] * (1 - 0.05 * s) + 0.1 * rng.standard_normal((k, size, size)), 0, 1)
            images.append((stack * 255).astype(np.uint8))
        seqs.append(PatientSequence(f"{p:03d}", "train", images, index=p))
    return seqs


CLOCK = time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_training(size: int, device: torch.device, steps: int, adversarial: bool) -> tuple[float, float]:
    """(sequences/s, target images/s) over ``steps`` training steps after one warm-up step."""
    cfg = preset("demo").crgan
    if not adversarial:
        cfg = cfg.model_copy(update={"lambda_adv": 0.0})
    seqs = synthetic_sequences(max(cfg.batch_size * (steps + 1), 16), size)
    model = CRGAN(cfg, size, [s.patient_id for s in seqs], device)
    batches = make_train_batches(seqs, cfg, seed=0, epoch=0)[: steps + 1]
    model.train_step(batches[0])
    _sync(device)
    t0 = CLOCK()
    n_seq = n_img = 0
    for b in batches[1:]:
        model.train_step(b)
        n_seq += len(b["patient"])
        n_img += len(b["sel_b"])
    _sync(device)
    dt = CLOCK() - t0
    return n_seq / dt, n_img / dt


def bench_generation(size: int, device: torch.device, k: int, repeats: int) -> tuple[float, float]:
    """(images/s batched, images/s one image per call) for one patient, 3 missing stages x k samples."""
    cfg = preset("demo").crgan
    seqs = synthetic_sequences(8, size)
    gen = CRGAN(cfg, size, [s.patient_id for s in seqs], device).generator.eval()
    context = {s: seqs[0].images[s] for s in seqs[0].observed}
    stages = [s for s in range(6) if s not in context][:3] or [1, 3, 5]
    generate(gen, context, 0, stages, k, 0, device)  # warm-up
    _sync(device)
    t0 = CLOCK()
    for r in range(repeats):
        generate(gen, context, 0, stages, k, r * k, device)
    _sync(device)
    batched = repeats * len(stages) * k / (CLOCK() - t0)
    t0 = CLOCK()
    n = 0
    for s in stages:
        for j in range(k):
            generate(gen, context, 0, [s], 1, [j], device)
            n += 1
    _sync(device)
    single = n / (CLOCK() - t0)
    return batched, single


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.clock} clock, demo widths "
          f"(ngf {preset('demo').crgan.ngf}, ndf {preset('demo').crgan.ndf}), batch {preset('demo').crgan.batch_size}")
    print(f"{'px':>4} {'train seq/s':>12} {'img/s':>8} {'L1-only seq/s':>14} {'GAN cost':>9} "
          f"{'gen img/s':>10} {'1-per-call img/s':>17} {'batching':>9}")
    for size in args.sizes:
        seq_s, img_s = bench_training(size, device, args.steps, adversarial=True)
        l1_seq_s, _ = bench_training(size, device, args.steps, adversarial=False)
        batched, single = bench_generation(size, device, args.k, repeats=3)
        print(f"{size:>4} {seq_s:>12.2f} {img_s:>8.1f} {l1_seq_s:>14.2f} {l1_seq_s / seq_s:>8.2f}x "
              f"{batched:>10.1f} {single:>17.1f} {batched / single:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
