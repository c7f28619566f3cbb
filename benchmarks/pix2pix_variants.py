"""Pix2Pix config variants against the Otsu and Frangi baselines (issue 3's 64 px bar). On demand.

    .venv/bin/python benchmarks/pix2pix_variants.py RUN_DIR/soul.h5 [--preset demo] [--seeds 0 1 2]
        [--variant '{}' --variant '{"pix2pix": {"max_rotation_deg": 0}}' ...]

Each (variant, seed) trains through the product's own code path (``train_pix2pix`` then
``evaluate_pix2pix`` in a fresh temporary run dir holding a copy of soul.h5): the checkpoint and
the labelling threshold are chosen on the validation patients, the test patients are scored
once, and Otsu and Frangi (tuned on train + val) are computed in the same run on the same test
images. Prints one row per run and, per variant, the mean and spread over seeds, so a variant is
judged by a difference larger than its seed spread, never by one lucky seed; choose between
variants by the validation Dice it also prints, so the test patients stay held out.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import flatten_fields, load_config  # noqa: E402
from tasks.pix2pix import evaluate_pix2pix, train_pix2pix  # noqa: E402


def quiet(_message: str) -> None:
    """Per-validation log lines would drown the table; the summary rows carry what matters."""


def run_one(soul_h5: Path, preset: str, variant: dict, seed: int, baselines_cache: Path | None = None) -> dict:
    """One variant and seed in a fresh directory; ``baselines_cache``: the label baselines shared by the variants
    (they depend on the data and seed, not on Pix2Pix's recipe, so only the first variant of a seed makes them)."""
    config = load_config(preset, **flatten_fields(variant), seed=seed)
    with tempfile.TemporaryDirectory(prefix="p2p-variant-") as tmp:
        shutil.copy2(soul_h5, Path(tmp) / "soul.h5")
        t0 = time.perf_counter()
        trained = train_pix2pix(tmp, config, log=quiet)
        section = evaluate_pix2pix(tmp, config, log=quiet, baselines_cache=baselines_cache)
    return {"seconds": time.perf_counter() - t0, "step": section["checkpoint"]["step"], "steps": trained.steps,
            "val_dice": trained.best_val_dice,
            "threshold": section["threshold"], "model": section["test"],
            "otsu": section["baselines"]["otsu"], "frangi": section["baselines"]["frangi"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("soul_h5", type=Path)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=None,
                        help="JSON object of config fields to override, nested like a config file")
    args = parser.parse_args(argv)
    variants = [json.loads(v) for v in (args.variant or ["{}"])]

    print(f"{'variant':48} seed  best step/steps  thr   val dice  pix2pix dice/cldice  otsu dice/cldice  frangi dice/cldice  seconds")
    with tempfile.TemporaryDirectory(prefix="p2p-variant-baselines-") as shared:  # one per invocation
        _run_variants(args, variants, Path(shared))
    return 0


def _run_variants(args: argparse.Namespace, variants: list[dict], baselines_cache: Path) -> None:
    for variant in variants:
        name = json.dumps(variant, separators=(",", ":"))
        rows = []
        for seed in args.seeds:
            r = run_one(args.soul_h5, args.preset, variant, seed, baselines_cache)
            rows.append(r)
            m, o, f = r["model"], r["otsu"], r["frangi"]
            print(f"{name:48} {seed:4d}  {r['step']:6d}/{r['steps']:<6d}   {r['threshold']:.2f}  {r['val_dice']:.3f}     "
                  f"{m['dice']:.3f} / {m['cldice']:.3f}        {o['dice']:.3f} / {o['cldice']:.3f}     "
                  f"{f['dice']:.3f} / {f['cldice']:.3f}       {r['seconds']:.0f}", flush=True)
        val = [r["val_dice"] for r in rows]
        print(f"{name:48} mean val dice (what to choose a variant by): {statistics.mean(val):.3f}", flush=True)
        for metric in ("dice", "cldice"):
            values = [r["model"][metric] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"{name:48} mean {metric}: {statistics.mean(values):.3f} +- {spread:.3f} over {len(values)} seeds; "
                  f"otsu {rows[0]['otsu'][metric]:.3f}, frangi {rows[0]['frangi'][metric]:.3f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
