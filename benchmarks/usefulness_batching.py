"""What batching a usefulness comparison's seeds saves. Run on demand; not part of pytest.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/usefulness_batching.py steps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/usefulness_batching.py step STUDY.h5 [--reps 2]
    .venv/bin/python benchmarks/usefulness_batching.py noise STUDY.h5 [--seeds 0]

* ``steps``: one training step (forward, backward, Adam) of the protocol's segmenter recipe (the demo
  preset's: dilated_bn, width 16, batch 16, 32 px windows) for S seeds: S nets one by one (contiguous and channels-last), the grouped
  net (:class:`brvo_models.segmenter.SeedGroupedNet`), the same in channels-last memory, and ``torch.func`` (``stack_module_state`` + ``vmap`` +
  ``functional_call``, batch-norm buffers stacked too). Short blocks of each, interleaved, the minimum kept.
* ``step``: the usefulness step's training work as run_protocol does it on a study file (an augmented.h5), with
  the demo preset's usefulness config: per arm, segmentation (one by one: ``run_segmentation`` per seed;
  batched: ``run_segmentation_seeds``) and the response forecaster per seed (unchanged, timed in both).
  The two variants alternate, ``--reps`` times each; the ratio of their least CPU times is printed, with the
  per-seed Dice of both, and a JSON line.

* ``noise``: the one-by-one recipe's own float noise, the same seed's real-only test Dice on 1 and 2 threads:
  the yardstick for the differences between batched and one-by-one training.

CPU seconds of this process (``time.process_time``) with one thread: the machine is shared by many jobs, and
wall time there mostly measures the scheduler.

Timings are ratios from one process on a shared machine: ``uptime`` is printed beside them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brvo_models.segmenter import SeedGroupedNet, VesselSegmenter, output_loss  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


#: CPU time of this process: with one thread it is the work itself, where wall time on a machine shared by
#: many jobs would mostly time the scheduler.
CLOCK = time.process_time


def best_of_blocks(fns: dict[str, callable], blocks: int, steps_per_block: int) -> dict[str, float]:
    """CPU seconds per call of each fn: the minimum over ``blocks`` blocks, the fns interleaved block by block."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            t = CLOCK()
            for _ in range(steps_per_block):
                fn()
            best[name] = min(best[name], (CLOCK() - t) / steps_per_block)
    return best


def step_fns(seeds: int, width: int, batch: int, crop: int) -> dict[str, callable]:
    """One training step of S segmenters three ways, on fixed random batches."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    nets = [VesselSegmenter("dilated_bn", 64, width) for _ in range(seeds)]
    x = torch.rand(batch, seeds, crop, crop) * 2 - 1
    y = (torch.rand(batch, seeds, crop, crop) > 0.9).float()

    alone = [copy.deepcopy(n).train() for n in nets]
    alone_opts = [torch.optim.Adam(n.parameters(), lr=3e-3) for n in alone]

    def one_by_one():
        for i, (net, opt) in enumerate(zip(alone, alone_opts)):
            loss = net.loss(x[:, i:i + 1], y[:, i:i + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    alone_cl = [copy.deepcopy(n).train().to(memory_format=torch.channels_last) for n in nets]
    alone_cl_opts = [torch.optim.Adam(n.parameters(), lr=3e-3) for n in alone_cl]
    x_parts_cl = [x[:, i:i + 1].contiguous(memory_format=torch.channels_last) for i in range(seeds)]

    def one_by_one_channels_last():
        for i, (net, opt) in enumerate(zip(alone_cl, alone_cl_opts)):
            loss = net.loss(x_parts_cl[i], y[:, i:i + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def grouped_step_in(memory_format: torch.memory_format):
        """A training step of the seeds as one grouped net, its weights and input in ``memory_format``."""
        grouped = SeedGroupedNet([copy.deepcopy(n) for n in nets]).train().to(memory_format=memory_format)
        opt = torch.optim.Adam(grouped.parameters(), lr=3e-3)
        inputs = x.contiguous(memory_format=memory_format)

        def step():
            out = grouped(inputs)
            loss = sum(output_loss(out[:, i:i + 1], y[:, i:i + 1], "dilated_bn") for i in range(seeds))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    grouped_step = grouped_step_in(torch.contiguous_format)
    grouped_channels_last_step = grouped_step_in(torch.channels_last)

    params, buffers = stack_module_state([copy.deepcopy(n.net).train() for n in nets])
    base = copy.deepcopy(nets[0].net).to("meta").train()
    vmap_opt = torch.optim.Adam(list(params.values()), lr=3e-3)
    xv, yv = x.permute(1, 0, 2, 3)[:, :, None], y.permute(1, 0, 2, 3)[:, :, None]

    def seed_loss(p, b, xs, ys):
        return output_loss(functional_call(base, (p, b), (xs,)), ys, "dilated_bn")

    batched_loss = vmap(seed_loss)

    def vmap_step():
        loss = batched_loss(params, buffers, xv, yv).sum()
        vmap_opt.zero_grad(set_to_none=True)
        loss.backward()
        vmap_opt.step()

    return {"one_by_one": one_by_one, "one_by_one_channels_last": one_by_one_channels_last, "grouped": grouped_step, "grouped_channels_last": grouped_channels_last_step,
            "vmap": vmap_step}


def run_steps(args) -> dict:
    fns = step_fns(args.seeds, args.width, args.batch, args.crop)
    before = uptime()
    best = best_of_blocks(fns, args.blocks, args.steps_per_block)
    out = {"section": "steps", "seeds": args.seeds, "threads": torch.get_num_threads(), "seconds_per_step": best,
           "speedup_vs_one_by_one": {k: best["one_by_one"] / v for k, v in best.items()},
           "uptime_before": before, "uptime_after": uptime()}
    for k, v in best.items():
        print(f"{k:>24}: {v * 1e3:7.2f} CPU ms a step for {args.seeds} seeds ({best['one_by_one'] / v:.2f}x one by one)")
    return out


def run_step(args) -> dict:
    """The usefulness step's training work, one by one vs batched, alternating."""
    from tasks.analyses import usefulness_protocol as up
    from tasks.config import preset

    config = preset("demo").usefulness
    data = up.load_study_data(args.study)
    evaluate, val = data.real[config.eval_split], data.real["val"]
    syn = up.filter_synthetic(data.synthetic_train, config.synthetic_filter)
    arms = {"real_only": data.real["train"], "real_plus_synthetic": up.Rows.concat(data.real["train"], syn)}
    seeds = list(range(config.seeds))

    with_response = not args.response_once

    def work(batched: bool) -> dict:
        t = {"segmentation": 0.0, "response": 0.0, "segmentation_wall": 0.0}
        dice = {}
        for name, rows in arms.items():
            t0, w0 = CLOCK(), time.perf_counter()
            if batched:
                seg = up.run_segmentation_seeds([rows] * len(seeds), val, evaluate, config, seeds, "cpu")
            else:
                seg = [up.run_segmentation(rows, val, evaluate, config, s, "cpu") for s in seeds]
            t["segmentation"] += CLOCK() - t0
            t["segmentation_wall"] += time.perf_counter() - w0
            t0 = CLOCK()
            if "response" in config.tasks and (with_response or not batched):
                for s in seeds:
                    up.run_response(rows, evaluate, config, s)
            t["response"] += CLOCK() - t0
            dice[name] = [round(r["dice"], 5) for r in seg]
        t["total"] = t["segmentation"] + t["response"]
        return {"seconds": t, "dice": dice}

    runs = {"one_by_one": [], "batched": []}
    uptimes = [uptime()]
    for rep in range(args.reps):
        for name in ("one_by_one", "batched") if rep % 2 == 0 else ("batched", "one_by_one"):
            runs[name].append(work(name == "batched"))
            uptimes.append(uptime())
            print(name, json.dumps(runs[name][-1]), uptimes[-1], flush=True)
    best = {k: {part: min(r["seconds"][part] for r in v) for part in ("segmentation", "response", "total")}
            for k, v in runs.items()}
    if args.response_once:  # the forecaster is the same code in both variants: timed in the one-by-one runs only
        best["batched"]["response"] = best["one_by_one"]["response"]
        best["batched"]["total"] = best["batched"]["segmentation"] + best["batched"]["response"]
    ratio = {part: best["one_by_one"][part] / best["batched"][part] for part in ("segmentation", "total")}
    print(f"segmentation CPU: one by one {best['one_by_one']['segmentation']:.1f} s, batched "
          f"{best['batched']['segmentation']:.1f} s: {ratio['segmentation']:.2f}x; the step's training work "
          f"(segmentation + response): {ratio['total']:.2f}x")
    return {"section": "step", "study": str(args.study), "rows": {k: len(v) for k, v in arms.items()},
            "seeds": seeds, "threads": torch.get_num_threads(), "runs": runs, "best_seconds": best,
            "speedup": ratio, "uptime": uptimes}


def run_noise(args) -> dict:
    """The one-by-one recipe's own float noise: the same seed trained on 1 and on 2 threads (the same code)."""
    from tasks.analyses import usefulness_protocol as up
    from tasks.config import preset

    config = preset("demo").usefulness
    data = up.load_study_data(args.study)
    val, evaluate = data.real["val"], data.real[config.eval_split]
    out = {}
    for seed in args.seeds:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[f"seed{seed}_threads{threads}"] = up.run_segmentation(data.real["train"], val, evaluate, config,
                                                                      seed, "cpu")["dice"]
            print(f"real_only seed {seed}, {threads} thread(s): test Dice {out[f'seed{seed}_threads{threads}']:.5f}",
                  flush=True)
    return {"section": "noise", "study": str(args.study), "dice": out, "uptime": uptime()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="section", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--width", type=int, default=16)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--crop", type=int, default=32)
    s.add_argument("--blocks", type=int, default=7)
    s.add_argument("--steps-per-block", type=int, default=20)
    p = sub.add_parser("step")
    p.add_argument("study", type=Path, help="an augmented.h5 (a run's real and synthetic rows)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--response-once", action="store_true",
                   help="train the forecasters in the one-by-one runs only (unchanged code) and count them in both")
    n = sub.add_parser("noise")
    n.add_argument("study", type=Path, help="an augmented.h5")
    n.add_argument("--seeds", type=int, nargs="+", default=[0])
    for q in (s, p, n):
        q.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; {uptime()}")
    result = {"steps": run_steps, "step": run_step, "noise": run_noise}[args.section](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
