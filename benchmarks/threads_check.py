"""Wall time of one demo training step at 64 px, fp32 against bf16, at a given thread count.

    .venv/bin/python benchmarks/threads_check.py --threads 2
    .venv/bin/python benchmarks/threads_check.py --threads 1

Why: on the CPU the pipeline's steps run one after another, each on every core. Whether running the two
trainings at once (a thread each) would pay depends on how much a second thread speeds one step up; whether
bf16 pays depends on the CPU's bf16 instructions. Run both thread counts back to back on a quiet machine and
compare (docs/performance.md). Uses benchmarks/roofline.py's model steps: the demo preset's Pix2Pix, CRGAN and
usefulness segmenter on synthetic batches; blocks interleave fp32 and bf16, the best block counts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roofline import MODELS, model_step, time_block, uptime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps-per-block", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {uptime()}")
    for name in MODELS:
        step = model_step(name, args.size)
        for precision in ("fp32", "bf16"):
            time_block(step, 3, precision)  # warm-up
        best: dict[str, float] = {}
        for _ in range(args.blocks):
            for precision in ("fp32", "bf16"):
                wall = time_block(step, args.steps_per_block, precision)["wall_s"]
                best[precision] = min(best.get(precision, float("inf")), wall)
        print(f"{name:10s} fp32 {best['fp32'] * 1e3:7.1f} ms  bf16 {best['bf16'] * 1e3:7.1f} ms  "
              f"bf16 speed-up {best['fp32'] / best['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
