"""Flip-averaged labels vs one pass, on validation patients, for trained Pix2Pix generators. On demand.

    .venv/bin/python benchmarks/flip_average_check.py RUN_DIR [RUN_DIR ...]

For every Pix2Pix best.pt of each run directory (the run's own, and those of the usefulness subsets
under RUN_DIR/usefulness/), labels the run's validation patients twice with the same weights: one
pass per image, and the mean over the image's four flips (``brvo_models.flips``). Each gets the
threshold that maximises its mean val Dice (Pix2Pix's grid), so the comparison is paired and
neither is handicapped by the other's threshold. No test image is labelled: this is how
``pix2pix.flip_average`` was chosen (docs/robustness-grid.md), and it can be rerun on any dataset.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brvo_models.pix2pix import label_images, load_labeller  # noqa: E402
from brvo_models.metrics import choose_threshold  # noqa: E402
from tasks.pix2pix import load_split  # noqa: E402


def generators_of(run_dir: Path) -> list[Path]:
    own = run_dir / "checkpoints" / "pix2pix" / "best.pt"
    subsets = sorted(run_dir.glob("usefulness/subset_*/checkpoints/pix2pix/best.pt"))
    return ([own] if own.exists() else []) + subsets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    gains = []
    print("| run | generator | one pass: val Dice (threshold) | four flips: val Dice (threshold) | gain |")
    print("|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        checkpoints = generators_of(run_dir)
        if not checkpoints:
            print(f"| {run_dir} | no Pix2Pix best.pt | | | |")
            continue
        val_x, val_y, _ = load_split(run_dir / "soul.h5", ("val",))
        for checkpoint in checkpoints:
            generator, device = load_labeller(checkpoint, args.device)
            single, _ = label_images(generator, val_x, 0.5, device=device, flip_average=False)
            averaged, _ = label_images(generator, val_x, 0.5, device=device, flip_average=True)
            (t1, d1), (t4, d4) = choose_threshold(single, val_y), choose_threshold(averaged, val_y)
            gains.append(d4 - d1)
            name = "run" if checkpoint.parts[-4] == run_dir.name else checkpoint.parts[-4]
            print(f"| {run_dir.name} | {name} | {d1:.4f} ({t1:.2f}) | {d4:.4f} ({t4:.2f}) | {d4 - d1:+.4f} |",
                  flush=True)
    if gains:
        spread = f", sd {statistics.stdev(gains):.4f}" if len(gains) > 1 else ""
        print(f"\nfour flips higher for {sum(g > 0 for g in gains)} of {len(gains)} generators; "
              f"mean gain {statistics.mean(gains):+.4f}{spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
