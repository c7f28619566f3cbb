"""What is the augmentation worth? A small U-Net segmenter trained on real train rows only
vs real + accepted synthetic train rows, both for the same number of steps, evaluated on the
real test patients (Dice, clDice) over several seeds; written to report.json['usefulness'].

Synthetic rows of val/test patients are never used for training (they were generated from
those patients' real images), so the test patients stay unseen in both arms.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from brvo_models.segmenter import evaluate_segmenter, train_segmenter
from storage.paired_format import read_arrays, read_meta
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.reporting import run_log
from tasks.steps import Step, StepContext

if TYPE_CHECKING:
    from tasks.export import ExportResult

def measure_usefulness(run_dir: Path, config: PipelineConfig, *, steps: int | None = None, log=run_log) -> dict:
    t0 = time.perf_counter()
    path = RunPaths.of(run_dir).augmented_h5
    meta = read_meta(path)
    images, labels = read_arrays(path)
    real_train = ((~meta["is_synthetic"]) & (meta["split"] == "train")).to_numpy()
    syn_train = (meta["is_synthetic"] & meta["accepted"] & (meta["split"] == "train")).to_numpy()
    test = ((~meta["is_synthetic"]) & (meta["split"] == "test")).to_numpy()
    steps = steps if steps is not None else config.usefulness_steps
    seeds = tuple(range(config.usefulness_seeds))
    arms = {"real_only": real_train, "real_plus_synthetic": real_train | syn_train}
    results: dict = {}
    for arm, mask in arms.items():
        runs = []
        for seed in seeds:
            net = train_segmenter(images[mask], labels[mask], image_size=config.image_size, steps=steps,
                                  seed=config.seed + seed, device=config.device)
            runs.append(evaluate_segmenter(net, images[test], labels[test]))
        results[arm] = {
            "dice": float(np.mean([r["dice"] for r in runs])), "dice_std": float(np.std([r["dice"] for r in runs])),
            "cldice": float(np.mean([r["cldice"] for r in runs])),
            "cldice_std": float(np.std([r["cldice"] for r in runs])),
            "per_seed_dice": [r["dice"] for r in runs], "n_train": int(mask.sum()), "n_test": int(test.sum()),
        }
    gain = results["real_plus_synthetic"]["dice"] - results["real_only"]["dice"]
    spread = max(results["real_only"]["dice_std"], results["real_plus_synthetic"]["dice_std"])
    direction = "raised" if gain > 0 else "lowered" if gain < 0 else "did not change"
    verdict = (f"adding accepted synthetic rows {direction} mean test Dice by {abs(gain):.4f} "
               f"({results['real_only']['dice']:.4f} -> {results['real_plus_synthetic']['dice']:.4f}; "
               f"seed spread {spread:.4f}, so the difference is "
               + ("within noise" if abs(gain) <= spread else "beyond the seed spread") + ")")
    section = {**results, "seeds": list(seeds), "steps": steps, "dice_gain": gain, "verdict": verdict,
               "seconds": round(time.perf_counter() - t0, 2)}
    log(f"usefulness: {verdict}")
    return section


class UsefulnessResult(BaseModel):
    section: dict[str, Any]

    def report_section(self) -> dict[str, Any]:
        return self.section


def usefulness_step(ctx: StepContext, export: ExportResult) -> UsefulnessResult:
    """The 'usefulness' step: does training on real + synthetic rows beat real rows alone?"""
    return UsefulnessResult(section=measure_usefulness(ctx.run_dir, ctx.config, log=ctx.log))


USEFULNESS = Step(
    name="usefulness", run=usefulness_step, result_type=UsefulnessResult, needs=("export",),
    config_fields=("seed", "image_size", "usefulness_steps", "usefulness_seeds"), report="usefulness",
    description="segmenter trained on real vs real + accepted synthetic rows, scored on real test patients")
