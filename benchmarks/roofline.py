"""How far each model's training step is from this machine's arithmetic peak, and where its time goes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/roofline.py [--sizes 64 128] [--blocks 5] [--json OUT]

For Pix2Pix (G and D), CRGAN and the usefulness segmenter, each with the demo preset's widths and batch,
at each size, measured in one process on the CPU:

* FLOPs of one training step (forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``;
  the optimisers' elementwise updates are not counted);
* CPU seconds per step (one thread: the machine is shared, so wall time would time the scheduler), split
  into data (making the batch: sampling, augmentation, crops), compute (forward and backward) and optimizer
  (the Adam updates, timed by wrapping each optimiser's ``step``): the block with the least CPU time of
  ``--blocks`` short blocks (its wall time beside it);
* achieved FLOP/s (FLOPs over compute + optimizer seconds) beside this machine's fp32 and bf16 matmul peak
  (2048 x 2048, best of three blocks), measured in the same run.

Timings on a shared machine: ``uptime`` is printed before and after. :func:`model_step` is reused by
benchmarks/bf16_check.py for its timing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from brvo_models.runtime import precision_scope  # noqa: E402

MODELS = ("pix2pix", "crgan", "segmenter")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on the CPU per CPU second (per thread's worth of CPU time with
    one thread): best of five blocks of ``reps``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = CLOCK()
        for _ in range(reps):
            a @ b
        best = min(best, CLOCK() - t)
    return 2 * n**3 * reps / best / 1e9


@dataclass
class ModelStep:
    """One model's training step, taken apart: ``data()`` makes a batch, ``train(batch)`` trains on it (forward,
    backward and the optimisers' steps), ``optimizers`` are the ones ``train`` steps."""

    name: str
    size: int
    batch_size: int
    data: Callable[[], Any]
    train: Callable[[Any], Any]
    optimizers: list[torch.optim.Optimizer]


def _images(size: int, n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vessel-like uint8 images and 0/1 labels: random bright lines on a textured background."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.uint8)
    for lab in labels:
        for _ in range(6):
            at, w = rng.integers(2, size - 4), max(1, size // 32)
            if rng.random() < 0.5:
                lab[at:at + w, :] = 1
            else:
                lab[:, at:at + w] = 1
    images = 60 + 120 * labels + rng.normal(0, 20, labels.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def model_step(name: str, size: int) -> ModelStep:
    """The demo preset's ``name`` ('pix2pix', 'crgan', 'segmenter') at ``size`` px on the CPU, ready to time."""
    from tasks.config import preset

    demo = preset("demo").with_overrides(image_size=size)
    torch.manual_seed(0)
    if name == "pix2pix":
        from brvo_models.pix2pix import Pix2Pix
        from tasks.pix2pix import make_batches

        x, y = _images(size)
        model = Pix2Pix(demo.pix2pix, size, "cpu")
        batches = make_batches(x, y, demo)
        state = {"epoch": 0, "it": iter(batches(0))}

        def data():
            try:
                return next(state["it"])
            except StopIteration:
                state["epoch"] += 1
                state["it"] = iter(batches(state["epoch"]))
                return next(state["it"])

        return ModelStep(name, size, demo.pix2pix.batch_size, data, model.train_step,
                         list(model.optimizers().values()))
    if name == "crgan":
        from crgan_bench import synthetic_sequences

        from brvo_models.crgan import CRGAN
        from brvo_models.crgan_data import make_train_batches

        cfg = demo.crgan
        seqs = synthetic_sequences(24, size)
        model = CRGAN(cfg, size, [s.patient_id for s in seqs], "cpu", train_seqs=seqs, seed=0)
        state = {"epoch": 0, "queue": []}

        def data():
            if not state["queue"]:
                state["queue"] = list(make_train_batches(seqs, cfg, 0, state["epoch"]))
                state["epoch"] += 1
            return state["queue"].pop(0)

        # make_train_batches builds an epoch at once: its cost per batch is what data() reports on average
        return ModelStep(name, size, cfg.batch_size, data, model.train_step, list(model.optimizers().values()))
    if name == "segmenter":
        from brvo_models.pix2pix import aligned_augment
        from brvo_models.segmenter import VesselSegmenter, random_windows

        r = demo.usefulness.segmenter
        x, y = _images(size)
        x_all = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
        y_all = torch.from_numpy(y.astype(np.float32))[:, None]
        net = VesselSegmenter(r.arch, size, r.width).train()
        opt = torch.optim.Adam(net.parameters(), lr=r.lr)
        g = torch.Generator().manual_seed(0)

        def data():
            idx = torch.randint(0, len(x_all), (r.batch_size,), generator=g)
            xb, yb = aligned_augment(x_all[idx], y_all[idx], g)
            if r.crop is not None and r.crop < size:
                xb, yb = random_windows(xb, yb, r.crop, g)
            return xb * 2 - 1, yb

        def train(batch):
            from brvo_models.runtime import autocast

            with autocast(torch.device("cpu")):
                loss = net.loss(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        return ModelStep(name, size, r.batch_size, data, train, [opt])
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


class OptimizerClock:
    """Adds up the CPU seconds spent in the optimisers' ``step`` (wrapped for as long as the clock is open)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers, self.seconds = optimizers, 0.0

    def __enter__(self):
        for opt in self.optimizers:
            original = opt.step

            def timed(*args, _original=original, **kwargs):
                t = CLOCK()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += CLOCK() - t

            opt.step = timed
        return self

    def __exit__(self, *exc):
        for opt in self.optimizers:
            del opt.step  # back to the class's method
        return False


#: The clock of the split: this process's CPU time. On a machine shared by many jobs, wall time measures the
#: scheduler as much as the step; with one thread (OMP_NUM_THREADS=1) CPU time is the step's own work.
CLOCK = time.process_time


def step_flops(step: ModelStep, precision: str = "fp32") -> int:
    batch = step.data()
    with precision_scope(precision), FlopCounterMode(display=False) as counter:
        step.train(batch)
    return int(counter.get_total_flops())


def time_block(step: ModelStep, n: int, precision: str) -> dict[str, float]:
    """Per step of ``n`` steps: CPU seconds of data, compute (forward + backward) and optimizer, their sum
    (``step_s``), and the wall seconds (``wall_s``)."""
    data_s = 0.0
    with precision_scope(precision), OptimizerClock(step.optimizers) as clock:
        w_all, t_all = time.perf_counter(), CLOCK()
        for _ in range(n):
            t = CLOCK()
            batch = step.data()
            data_s += CLOCK() - t
            step.train(batch)
        total, wall = CLOCK() - t_all, time.perf_counter() - w_all
    return {"data_s": data_s / n, "compute_s": (total - data_s - clock.seconds) / n, "optimizer_s": clock.seconds / n,
            "step_s": total / n, "wall_s": wall / n}


def best_blocks(steps: dict[str, tuple[ModelStep, str]], blocks: int, steps_per_block: int,
                warmup: int = 3) -> dict[str, dict[str, float]]:
    """Per key, the block with the smallest step time; the keys' blocks interleaved (a, b, a, b, ...)."""
    for step, precision in steps.values():
        time_block(step, warmup, precision)
    best: dict[str, dict[str, float]] = {}
    for _ in range(blocks):
        for key, (step, precision) in steps.items():
            got = time_block(step, steps_per_block, precision)
            if key not in best or got["step_s"] < best[key]["step_s"]:
                best[key] = got
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--steps-per-block", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "uptime_before": uptime()}
    print(f"torch {out['torch']}, {out['threads']} thread(s); {out['uptime_before']}", flush=True)
    out["peak_gflops"] = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"matmul peak: fp32 {out['peak_gflops']['fp32']:.1f} GFLOP/s, bf16 {out['peak_gflops']['bf16']:.1f} GFLOP/s",
          flush=True)
    rows = []
    print("| model | px | batch | GFLOP/step | CPU ms/step | data | compute | optimizer | wall ms | GFLOP/s | of fp32 peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for name in args.models:
            step = model_step(name, size)
            flops = step_flops(step)
            t = best_blocks({"fp32": (step, "fp32")}, args.blocks, args.steps_per_block)["fp32"]
            achieved = flops / (t["compute_s"] + t["optimizer_s"]) / 1e9
            row = {"model": name, "size": size, "batch": step.batch_size, "flops_per_step": flops, **t,
                   "achieved_gflops": achieved, "fraction_of_fp32_peak": achieved / out["peak_gflops"]["fp32"]}
            rows.append(row)
            print(f"| {name} | {size} | {step.batch_size} | {flops / 1e9:.2f} | {t['step_s'] * 1e3:.1f} | "
                  f"{t['data_s'] * 1e3:.1f} | {t['compute_s'] * 1e3:.1f} | {t['optimizer_s'] * 1e3:.1f} | "
                  f"{t['wall_s'] * 1e3:.0f} | {achieved:.1f} | {row['fraction_of_fp32_peak']:.0%} |", flush=True)
    out["rows"] = rows
    out["uptime_after"] = uptime()
    print(out["uptime_after"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
