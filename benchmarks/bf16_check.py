"""Does bf16 autocast on the CPU keep the held-out scores, and how much faster is a training step?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_check.py SOUL_H5 [--seeds 0 1] [--json OUT]

SOUL_H5: a preprocessed soul.h5 (docs/performance.md used the 24-patient 64 px phantom); it is only read.
The rule this run is judged by is in docs/performance.md ("bf16: the rule"), declared before the run.

* Quality: per seed, fp32 and bf16 in turn (the order alternates by seed), each with the demo preset's models
  on a shortened fixed schedule (``--pix2pix-epochs``, ``--crgan-epochs``, ``--segmenter-steps``), trained,
  validated and evaluated under that precision: Pix2Pix's test Dice (best.pt labelling the test patients, as
  benchmarks/batch_size_check.py scores it), CRGAN's held-out SSIM and PSNR (tasks.crgan.evaluate_crgan), and
  the usefulness segmenter's test Dice. Paired differences bf16 - fp32 by seed.
* Speed: each model's training step at 64 px (benchmarks/roofline.py's steps), fp32 and bf16 in interleaved
  short blocks in this process, the block with the least CPU time kept (one thread; CPU time, because on a
  shared machine wall time mostly measures the scheduler); ``uptime`` beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from batch_size_check import score_best  # noqa: E402
from roofline import best_blocks, model_step, uptime  # noqa: E402

from brvo_models.runtime import precision_scope  # noqa: E402
from brvo_models.segmenter import evaluate_segmenter, fit_segmenter  # noqa: E402
from tasks.config import preset  # noqa: E402
from tasks.crgan import evaluate_crgan, train_crgan  # noqa: E402
from tasks.pix2pix import load_split, train_pix2pix  # noqa: E402

PRECISIONS = ("fp32", "bf16")
#: docs/performance.md's rule: the least mean paired difference (bf16 - fp32) that keeps a score, and the speed-up
MARGINS = {"pix2pix_test_dice": -0.01, "crgan_ssim": -0.01, "crgan_psnr": -0.3, "segmenter_test_dice": -0.01}
MIN_SPEEDUP = 1.25


def log(msg: str) -> None:
    print(f"[bf16_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet(_msg: str) -> None:
    """The models' per-validation lines are left out; the summary rows carry what matters."""


def run_config(seed: int, precision: str, args):
    return preset("demo").with_overrides(**{
        "seed": seed,
        "pix2pix.schedule": "fixed", "pix2pix.epochs": args.pix2pix_epochs, "pix2pix.precision": precision,
        "pix2pix.checkpoint_every_s": 0.0,
        "crgan.schedule": "fixed", "crgan.epochs": args.crgan_epochs, "crgan.precision": precision,
        "crgan.checkpoint_every_s": 0.0,
        "usefulness.segmenter.precision": precision})


def quality_run(soul: Path, seed: int, precision: str, args, scratch: Path) -> dict[str, Any]:
    config = run_config(seed, precision, args)
    run_dir = scratch / f"{precision}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "soul.h5").symlink_to(soul)
    out: dict[str, Any] = {"seed": seed, "precision": precision}
    t = time.perf_counter()
    p2p = train_pix2pix(run_dir, config, log=quiet)
    out["pix2pix_train_s"] = round(time.perf_counter() - t, 1)
    with precision_scope(precision):
        scores = score_best(run_dir, config)
    out.update(pix2pix_steps=p2p.steps, pix2pix_val_dice=p2p.best_val_dice, pix2pix_test_dice=scores["dice"])
    t = time.perf_counter()
    crg = train_crgan(run_dir, config, log=quiet)
    out["crgan_train_s"] = round(time.perf_counter() - t, 1)
    with precision_scope(precision):
        section = evaluate_crgan(run_dir, config, log=quiet)
    model = section["heldout"]["model"]
    out.update(crgan_steps=crg.steps, crgan_val_ssim=crg.best_val_ssim, crgan_ssim=model["ssim"],
               crgan_psnr=model["psnr"])
    r = config.usefulness.segmenter
    tx, ty, _ = load_split(soul, ("train",))
    vx, vy, _ = load_split(soul, ("val",))
    ex, ey, _ = load_split(soul, ("test",))
    t = time.perf_counter()
    fitted = fit_segmenter(tx, ty, image_size=tx.shape[-1], steps=args.segmenter_steps, val_images=vx, val_labels=vy,
                           val_every=max(1, args.segmenter_steps // r.validations), arch=r.arch, width=r.width,
                           batch_size=r.batch_size, lr=r.lr, seed=seed, device="cpu", crop=r.crop,
                           precision=precision)
    out["segmenter_train_s"] = round(time.perf_counter() - t, 1)
    with precision_scope(precision):
        out["segmenter_test_dice"] = evaluate_segmenter(fitted.net, ex, ey)["dice"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def paired(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    by = {(r["seed"], r["precision"]): r[key] for r in runs}
    seeds = sorted({s for s, p in by if (s, "fp32") in by and (s, "bf16") in by})
    diffs = [by[(s, "bf16")] - by[(s, "fp32")] for s in seeds]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    return {"seeds": seeds, "fp32": [by[(s, "fp32")] for s in seeds], "bf16": [by[(s, "bf16")] for s in seeds],
            "diffs": diffs, "mean_diff": mean, "margin": MARGINS[key], "holds": bool(diffs) and mean >= MARGINS[key]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("soul_h5", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--pix2pix-epochs", type=int, default=10)
    ap.add_argument("--crgan-epochs", type=int, default=40)
    ap.add_argument("--segmenter-steps", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--steps-per-block", type=int, default=6)
    ap.add_argument("--skip-quality", action="store_true", help="time the steps only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "uptime": [uptime()]}
    log(result["uptime"][0])

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))

    speed = {}
    for name in ("pix2pix", "crgan", "segmenter"):
        step = model_step(name, 64)
        best = best_blocks({p: (step, p) for p in PRECISIONS}, args.blocks, args.steps_per_block)
        speed[name] = {**{p: best[p] for p in PRECISIONS}, "speedup": best["fp32"]["step_s"] / best["bf16"]["step_s"]}
        log(f"{name} 64 px step: fp32 {best['fp32']['step_s'] * 1e3:.1f} ms, bf16 {best['bf16']['step_s'] * 1e3:.1f} ms "
            f"({speed[name]['speedup']:.2f}x); {uptime()}")
    result["speed"] = speed
    result["uptime"].append(uptime())
    save()
    runs: list[dict[str, Any]] = []
    if not args.skip_quality:
        with tempfile.TemporaryDirectory(prefix="bf16-check-") as tmp:
            for seed in args.seeds:
                for precision in PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]:
                    runs.append(quality_run(args.soul_h5.resolve(), seed, precision, args, Path(tmp)))
                    log(json.dumps(runs[-1]))
                    result["runs"] = runs
                    save()
    quality = {k: paired(runs, k) for k in MARGINS} if runs else {}
    speed_holds = all(speed[m]["speedup"] >= MIN_SPEEDUP for m in ("pix2pix", "crgan"))
    result.update(quality=quality, speed_holds=speed_holds, min_speedup=MIN_SPEEDUP,
                  bf16_default=bool(quality) and speed_holds and all(q["holds"] for q in quality.values()))
    result["uptime"].append(uptime())
    for k, q in quality.items():
        log(f"{k}: fp32 {q['fp32']} bf16 {q['bf16']} mean paired diff {q['mean_diff']:+.4f} (margin {q['margin']}): "
            f"{'holds' if q['holds'] else 'FAILS'}")
    log(f"speed-up >= {MIN_SPEEDUP}x for Pix2Pix and CRGAN: {speed_holds}; bf16 default by the rule: "
        f"{result['bf16_default']}")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
