"""Metrics benchmark: images/s of the numpy/skimage path vs the batched torch path (run on demand).

    .venv/bin/python benchmarks/metrics_bench.py [--n 64] [--sizes 64 256] [--repeats 3] [--json out.json]

For each metric (mse, psnr, ssim, cosine, dice, iou, cldice) and image size, the numpy path
(brvo_models.metrics, one call per image, as the evaluation loops do today) and the torch path
(brvo_models.batched_metrics, one call per batch) score the same N image pairs / mask pairs;
the torch path on the CPU, and on CUDA when one is visible. Every ratio is torch over numpy
from the same run. The torch timings start from numpy arrays on the host (the copy to the
device and the device synchronisation are inside the timing), as a caller holding numpy arrays
would see them. Each figure is the best of --repeats runs after one warm-up call; the machine
may be shared, so the load average is printed.

Inputs are vessel-like: images are blurred ridge patterns with noise, masks are the ridges
(1-3 px curvy lines, whose skeletons take several thinning iterations), predictions are the
masks with 3 % of pixels flipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brvo_models import batched_metrics as B  # noqa: E402
from brvo_models import metrics as M  # noqa: E402

IMAGE_METRICS = ("mse", "psnr", "ssim", "cosine")
LABEL_METRICS = ("dice", "iou", "cldice", "cldice[torch]")
# cldice: the default skeleton backend ("auto": skimage on CPU tensors, the torch port on CUDA);
# cldice[torch]: the torch port everywhere, to show why "auto" keeps skimage on the CPU.
TORCH_LABEL_FNS = {**B.LABEL_METRICS, "cldice[torch]": lambda p, t, device=None: B.cldice(
    p, t, device=device, skeleton_backend="torch")}


def make_inputs(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 24) for _ in range(n)])
    noise /= noise.std(axis=(1, 2), keepdims=True)
    truth = np.abs(noise) < 0.12  # zero crossings of smooth noise: thin curvy vessel-like lines
    pred = truth ^ (rng.random(truth.shape) < 0.03)
    image = np.clip(0.2 + 0.6 * np.stack([ndimage.gaussian_filter(t.astype(float), 0.8) for t in truth])
                    + 0.05 * rng.standard_normal(truth.shape), 0, 1)
    regenerated = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0, 1)
    return {"image": image, "regenerated": regenerated, "truth": truth, "pred": pred}


def best_seconds(fn, repeats: int, sync) -> float:
    fn()
    sync()  # warm-up (kernel selection, allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per batch")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"devices {devices}" + (f" ({torch.cuda.get_device_name()})" if "cuda" in devices else ""))
    results = []
    for size in args.sizes:
        data = make_inputs(args.n, size)
        for name in IMAGE_METRICS + LABEL_METRICS:
            if name in IMAGE_METRICS:
                a, b = data["regenerated"], data["image"]
                np_fn, t_fn = M.IMAGE_METRICS[name], B.IMAGE_METRICS[name]
            else:
                a, b = data["pred"], data["truth"]
                np_fn, t_fn = M.LABEL_METRICS[name.split("[")[0]], TORCH_LABEL_FNS[name]
            row = {"metric": name, "size": size, "n": args.n}
            sec = best_seconds(lambda: [np_fn(x, y) for x, y in zip(a, b)], args.repeats, lambda: None)
            row["numpy_img_s"] = args.n / sec
            for dev in devices:
                sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
                sec = best_seconds(lambda: t_fn(a, b, device=dev), args.repeats, sync)
                row[f"torch_{dev}_img_s"] = args.n / sec
                row[f"torch_{dev}_over_numpy"] = row[f"torch_{dev}_img_s"] / row["numpy_img_s"]
            results.append(row)

    header = f"{'metric':14s} {'px':>4s} {'numpy img/s':>12s}" + "".join(
        f" {'torch ' + d + ' img/s':>17s} {'ratio':>7s}" for d in devices)
    print(header)
    for r in results:
        print(f"{r['metric']:14s} {r['size']:4d} {r['numpy_img_s']:12.0f}" + "".join(
            f" {r[f'torch_{d}_img_s']:17.0f} {r[f'torch_{d}_over_numpy']:6.1f}x" for d in devices))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return {"results": results}


if __name__ == "__main__":
    main()
