"""Pix2Pix training throughput on this machine (issue 3, item 6). Run on demand; not part of pytest.

    .venv/bin/python benchmarks/train_bench.py [--sizes 64 128 256] [--quick]

Prints, measured in the same run:
* fp32 matmul GFLOP/s of this machine through torch (the ceiling a conv net can approach);
* training images/s at each size (the demo preset's widths and norm, batch 8; plus the reference widths
  ngf=ndf=64, batch 1 at 256 px), with the achieved GFLOP/s of one full training step
  (G forward, D step, G step; counted by torch.utils.flop_counter) as a fraction of matmul;
* variants: contiguous vs channels_last, eager vs torch.compile, 1 vs all threads, so the
  training code keeps what measures faster;
* the data path: batches cut from in-memory tensors vs a DataLoader over the HDF5 file;
* on CUDA (when present): 256 px at batch 32, bf16 autocast.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brvo_models.configs import Pix2PixConfig  # noqa: E402
from brvo_models.pix2pix import Pix2Pix  # noqa: E402
from tasks.config import preset  # noqa: E402


def matmul_gflops(n: int = 1024, reps: int = 20, device: str = "cpu", dtype=torch.float32) -> float:
    """GFLOP/s of an n x n matmul on this machine: the reference the step figures are read against."""
    from gpu_bench import matmul_peak  # benchmarks/ is on sys.path when a benchmark runs as a script

    return matmul_peak(torch.device(device), n, reps, dtype)["tflops"] * 1e3


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _batch(bs: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(bs, 1, size, size, generator=g) < 0.15).float()
    image = (label * 0.6 + 0.3 * torch.rand(bs, 1, size, size, generator=g)).clamp(0, 1)
    return (image * 2 - 1).to(device), (label * 2 - 1).to(device)


def step_flops(model: Pix2Pix, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        model.train_step(batch)
    return counter.get_total_flops()


def time_steps(model: Pix2Pix, batch, seconds: float, device: str) -> float:
    """Median seconds per training step over repeated short windows (robust to a shared machine)."""
    for _ in range(3):  # warm-up (and compile)
        model.train_step(batch)
    _sync(device)
    samples, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(samples) < 5:
        t = time.perf_counter()
        model.train_step(batch)
        _sync(device)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def make_model(cfg: Pix2PixConfig, size: int, device: str, channels_last: bool, compiled: bool) -> Pix2Pix:
    torch.manual_seed(0)
    model = Pix2Pix(cfg, size, device, channels_last=channels_last)
    if compiled:
        model.G = torch.compile(model.G)
        model.D = torch.compile(model.D)
    return model


def bench_case(label: str, cfg: Pix2PixConfig, size: int, bs: int, device: str, ref_gflops: float, seconds: float,
               channels_last: bool = False, compiled: bool = False) -> dict:
    batch = _batch(bs, size, device)
    flops = step_flops(make_model(cfg, size, device, channels_last, False), batch)
    try:
        model = make_model(cfg, size, device, channels_last, compiled)
        dt = time_steps(model, batch, seconds, device)
    except Exception as exc:  # torch.compile may be unavailable (no compiler): report, go on
        print(f"  {label:<44} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return {}
    gflops = flops / dt / 1e9
    row = {"label": label, "size": size, "bs": bs, "img_s": bs / dt, "step_ms": dt * 1e3,
           "gflop_step": flops / 1e9, "gflops": gflops, "frac": gflops / ref_gflops}
    print(f"  {label:<44} {row['img_s']:8.1f} img/s  {row['step_ms']:8.1f} ms/step  "
          f"{row['gflop_step']:7.2f} GFLOP/step  {gflops:7.1f} GFLOP/s = {row['frac']:.0%} of matmul")
    return row


def bench_data_path(seconds: float) -> None:
    """In-memory batches (what tasks/train_pix2pix does) vs a DataLoader over soul.h5, 64 px, batch 8."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import write_blob_dataset
    from storage.torch_dataset import PairedImageDataset
    from tasks.pix2pix import load_split, make_batches

    with tempfile.TemporaryDirectory() as tmp:
        path = write_blob_dataset(Path(tmp) / "soul.h5", n_patients=40, image_size=64)
        t = time.perf_counter()
        x, y, _ = load_split(path, ("train", "val", "test"))
        t_load = time.perf_counter() - t

        def rate(batch_iter) -> float:
            n, t, epoch = 0, time.perf_counter(), 0
            while time.perf_counter() - t < seconds:
                for bx, _ in batch_iter(epoch):
                    n += len(bx)
                epoch += 1
            return n / (time.perf_counter() - t)

        demo = preset("demo")
        plain = demo.model_copy(update={"pix2pix": demo.pix2pix.model_copy(update={"augment": False})})
        mem_plain = rate(make_batches(x, y, plain))
        mem_aug = rate(make_batches(x, y, demo))
        loader = torch.utils.data.DataLoader(PairedImageDataset(path), batch_size=8, shuffle=True, num_workers=0,
                                             collate_fn=lambda rows: (torch.stack([r[0] for r in rows]),
                                                                      torch.stack([r[1] for r in rows])))
        dl_rate = rate(lambda epoch: loader)
        print(f"  in-memory tensors, no augmentation:        {mem_plain:9.0f} img/s "
              f"(one-off load {t_load * 1e3:.0f} ms for {len(x)} images)")
        print(f"  DataLoader over soul.h5, 0 workers:         {dl_rate:9.0f} img/s "
              f"(in-memory is {mem_plain / dl_rate:.2f}x this)")
        print(f"  in-memory + aligned flips/rotations:        {mem_aug:9.0f} img/s")
        print("  Compare with the training step's img/s above: the data path is not the bottleneck.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing window per case")
    ap.add_argument("--quick", action="store_true", help="skip the variant and data-path comparisons")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {threads} threads; load average "
          f"{os.getloadavg()[0]:.1f} (a shared machine inflates every time below)")
    ref = matmul_gflops()
    print(f"fp32 matmul 1024^3 on CPU: {ref:.1f} GFLOP/s")
    demo = preset("demo").pix2pix
    print(f"\nPix2Pix training step on CPU (demo preset: ngf {demo.ngf}, ndf {demo.ndf}, {demo.norm} norm, "
          f"batch 8; contiguous, eager):")
    for size in args.sizes:
        bench_case(f"{size} px", demo, size, 8, "cpu", ref, args.seconds)
    if 256 in args.sizes:
        bench_case("256 px reference widths ngf=ndf=64, batch 1", Pix2PixConfig(), 256, 1, "cpu", ref, args.seconds)
    if not args.quick:
        print("\nVariants at 64 px, demo widths, batch 8:")
        base = bench_case("eager, contiguous", demo, 64, 8, "cpu", ref, args.seconds)
        cl = bench_case("eager, channels_last", demo, 64, 8, "cpu", ref, args.seconds, channels_last=True)
        comp = bench_case("torch.compile, contiguous", demo, 64, 8, "cpu", ref, args.seconds, compiled=True)
        torch.set_num_threads(1)
        one = bench_case("eager, contiguous, 1 thread", demo, 64, 8, "cpu", ref, args.seconds)
        torch.set_num_threads(threads)
        rows = [r for r in (base, cl, comp, one) if r]
        if rows:
            best = max(rows, key=lambda r: r["img_s"])
            print(f"  fastest: {best['label']} ({best['img_s'] / base['img_s']:.2f}x eager contiguous)"
                  if base else f"  fastest: {best['label']}")
        print("\nData path (64 px, batch 8):")
        bench_data_path(min(args.seconds, 3.0))
    if torch.cuda.is_available():
        gpu_ref = matmul_gflops(4096, 50, "cuda", torch.bfloat16)
        print(f"\nCUDA {torch.cuda.get_device_name()}: bf16 matmul {gpu_ref:.0f} GFLOP/s")
        bench_case("256 px reference widths, batch 32, bf16 autocast", Pix2PixConfig(), 256, 32, "cuda", gpu_ref,
                   args.seconds)


if __name__ == "__main__":
    main()
