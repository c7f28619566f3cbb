"""Does a larger Pix2Pix batch keep the held-out Dice of batch 1 at equal epochs? (issue 12, item 2)

    python benchmarks/batch_size_check.py RUN_DIR                      # full preset, 5 epochs, seeds 0 1
    python benchmarks/batch_size_check.py RUN_DIR --epochs 10 --seeds 0 1 2 --variants b1 b8 b8_sqrt_lr
    python benchmarks/batch_size_check.py RUN_DIR --preset tiny --epochs 1 --seeds 0   # CPU smoke test

RUN_DIR holds a preprocessed soul.h5 (any run of the flow at the preset's size; it is only read). For
every seed and variant, Pix2Pix trains with the product's own ``train_pix2pix`` on the train split, for the
same number of epochs on a fixed schedule (constant lr, then linear decay over the last ``decay_fraction``;
the preset's other Pix2Pix fields, such as widths and norm, kept), keeping the weights the validation
patients choose, in a scratch run directory; then its best.pt labels the test patients' real rows and
is scored as the report scores it (Dice, clDice). Variants:

* ``b1``: the reference pix2pix's batch 1 and lr 2e-4 (eager);
* ``b8``: batch 8, the same lr;
* ``b8_sqrt_lr``: batch 8, lr x sqrt(8) (the square-root scaling rule for Adam);
* ``b8_linear_lr``: batch 8, lr x 8 (the linear scaling rule).

The rule, fixed before any number was seen: a batch-8 variant keeps batch 1's quality when its paired
(same seed) test-Dice difference from ``b1`` has a mean at or above -2 standard errors of that mean (with one
seed: at or above -0.005, the seed-to-seed spread measured on the demo). Runs are ordered seed by seed so a run
cut short by ``--deadline-s`` still leaves complete pairs; the JSON (``--json``) is rewritten after every run.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks.pix2pix as train_module  # noqa: E402
from brvo_models import batched_metrics  # noqa: E402
from brvo_models.configs import Pix2PixConfig  # noqa: E402
from brvo_models.pix2pix import label_images, load_labeller  # noqa: E402
from brvo_models.training import BEST  # noqa: E402
from storage.run_dir import RunPaths  # noqa: E402
from tasks.config import preset  # noqa: E402

VARIANTS: dict[str, tuple[int, float]] = {  # name -> (batch size, lr as a multiple of the reference's 2e-4)
    "b1": (1, 1.0),
    "b8": (8, 1.0),
    "b8_sqrt_lr": (8, math.sqrt(8.0)),
    "b8_linear_lr": (8, 8.0),
}
ONE_SEED_TOLERANCE = 0.005


def log(msg: str) -> None:
    print(f"[batch_size_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def variant_config(preset_name: str, variant: str, epochs: int, seed: int):
    batch, lr_factor = VARIANTS[variant]
    return preset(preset_name).with_overrides(**{
        "seed": seed, "pix2pix.schedule": "fixed", "pix2pix.epochs": epochs,
        "pix2pix.batch_size": batch, "pix2pix.lr": Pix2PixConfig().lr * lr_factor,
        "pix2pix.cuda_graphs": False, "pix2pix.checkpoint_every_s": 0.0})


def score_best(run_dir: Path, config) -> dict[str, float]:
    """Test Dice / clDice of the run's best.pt, labelled and scored as evaluate_pix2pix does (no baselines)."""
    paths = RunPaths.of(run_dir)
    generator, device = load_labeller(paths.checkpoints("pix2pix") / BEST, config.device, config.image_size)
    test_x, test_y, _ = train_module.load_split(paths.soul_h5, ("test",))
    _, masks = label_images(generator, test_x, float(generator.label_threshold), batch_size=64, device=device)
    scores = train_module.mask_scores(masks, test_y, batched_metrics.metrics_device(device, "auto"))
    return {"dice": scores["dice"], "cldice": scores["cldice"], "n_test": scores["n"]}


def run_one(soul: Path, preset_name: str, variant: str, epochs: int, seed: int, scratch: Path) -> dict[str, Any]:
    config = variant_config(preset_name, variant, epochs, seed)
    run_dir = scratch / f"{variant}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "soul.h5").symlink_to(soul)
    t0 = time.perf_counter()
    result = train_module.train_pix2pix(run_dir, config, log=lambda m: None)
    train_s = time.perf_counter() - t0
    scores = score_best(run_dir, config)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"variant": variant, "seed": seed, "batch_size": config.pix2pix.batch_size, "lr": config.pix2pix.lr,
            "epochs": epochs, "steps": result.steps, "best_epoch": result.best_epoch,
            "best_val_dice": result.best_val_dice, "test_dice": scores["dice"], "test_cldice": scores["cldice"],
            "n_test": scores["n_test"], "train_s": round(train_s, 1)}


def verdicts(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per batch-8 variant: the paired test-Dice difference from b1 over the seeds both finished, and the rule."""
    by = {(r["variant"], r["seed"]): r for r in runs}
    out = {}
    for variant in sorted({r["variant"] for r in runs} - {"b1"}):
        seeds = sorted(s for (v, s) in by if v == variant and ("b1", s) in by)
        if not seeds:
            continue
        diffs = [by[(variant, s)]["test_dice"] - by[("b1", s)]["test_dice"] for s in seeds]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        bar = -2 * se if se is not None else -ONE_SEED_TOLERANCE
        out[variant] = {"seeds": seeds, "paired_dice_diff_mean": round(mean, 4),
                        "paired_dice_diff_se": None if se is None else round(se, 4), "bar": round(bar, 4),
                        "keeps_batch1_quality": mean >= bar,
                        "train_s_ratio_to_b1": round(statistics.fmean(by[(variant, s)]["train_s"] for s in seeds)
                                                     / statistics.fmean(by[("b1", s)]["train_s"] for s in seeds), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with a preprocessed soul.h5 (read only)")
    ap.add_argument("--preset", default="full", help="the preset whose Pix2Pix is compared (default full)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["b1", "b8", "b8_sqrt_lr"], choices=sorted(VARIANTS))
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no run that its variant's last duration says would end after this many seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    soul = RunPaths.of(args.run_dir).soul_h5.resolve()
    if not soul.is_file():
        ap.error(f"{soul}: no soul.h5; run the flow (or its preprocess step) into RUN_DIR first")
    if "b1" not in args.variants:
        args.variants = ["b1", *args.variants]
    # every run reads the same rows: read them once (the 256 px soul.h5 takes seconds to decompress)
    read_split = functools.lru_cache(maxsize=8)(train_module.load_split)
    train_module.load_split = lambda path, splits: read_split(Path(path).resolve(), tuple(splits))
    for splits in (("train",), ("val",), ("test",)):  # read before any run is timed
        train_module.load_split(soul, splits)
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    last_s: dict[str, float] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="batch_size_check_") as scratch:
        for seed in args.seeds:
            for variant in args.variants:
                elapsed = time.perf_counter() - start
                if args.deadline_s is not None and elapsed + last_s.get(variant, 0.0) > args.deadline_s:
                    skipped.append(f"{variant} seed {seed}")
                    continue
                t0 = time.perf_counter()
                row = run_one(soul, args.preset, variant, args.epochs, seed, Path(scratch))
                last_s[variant] = time.perf_counter() - t0
                runs.append(row)
                log(f"{variant} seed {seed}: batch {row['batch_size']} lr {row['lr']:.2e} {row['steps']} steps "
                    f"in {row['train_s']} s; best epoch {row['best_epoch']:.2f} val dice {row['best_val_dice']:.4f}; "
                    f"test dice {row['test_dice']:.4f} cldice {row['test_cldice']:.4f}")
                result = {"preset": args.preset, "epochs": args.epochs, "runs": runs, "verdicts": verdicts(runs),
                          "skipped": skipped, "rule": "a batch-8 variant keeps batch 1's quality when the mean "
                          "paired (same seed) test-Dice difference from b1 is at or above -2 SE (one seed: at or above "
                          f"-{ONE_SEED_TOLERANCE})"}
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
    result = {"preset": args.preset, "epochs": args.epochs, "runs": runs, "verdicts": verdicts(runs),
              "skipped": skipped}
    if args.json:
        args.json.write_text(json.dumps({**result, "rule": "see the module docstring"}, indent=2))
    print(f"{'variant':<14}{'seed':>5}{'batch':>6}{'lr':>10}{'steps':>7}{'train s':>9}{'test dice':>11}"
          f"{'test cldice':>13}")
    for r in runs:
        print(f"{r['variant']:<14}{r['seed']:>5}{r['batch_size']:>6}{r['lr']:>10.2e}{r['steps']:>7}"
              f"{r['train_s']:>9}{r['test_dice']:>11.4f}{r['test_cldice']:>13.4f}")
    for variant, v in result["verdicts"].items():
        print(f"{variant}: paired dice diff {v['paired_dice_diff_mean']:+.4f} (SE {v['paired_dice_diff_se']}) over "
              f"seeds {v['seeds']}, bar {v['bar']:+.4f} -> {'keeps' if v['keeps_batch1_quality'] else 'LOSES'} "
              f"batch 1's quality; train time x{v['train_s_ratio_to_b1']} of b1")
    if skipped:
        print("skipped (deadline):", ", ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
