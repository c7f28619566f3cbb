"""The full usefulness study (tasks/analyses/usefulness_protocol.py) on a finished run, and the recipe tuning behind it.

    # choose the downstream recipes on the validation patients, real rows only (prints a table)
    python benchmarks/usefulness_study.py tune RUN_DIR
    # the study: every arm x task x seed, scored on the test patients; prints the protocol's tables
    python benchmarks/usefulness_study.py study RUN_DIR --out study.json [--seeds 3] \
        [--config '{"low_data_fractions": [0.25], "synthetic_labels": "segmenter"}']
    # the learning-curve gate alone (real rows only: RUN_DIR needs soul.h5, e.g. after `brvo-augment prepare`):
    # real-only at each arm's size, twice it and the full split, and which arms are measurable
    python benchmarks/usefulness_study.py gate RUN_DIR --out gate.json [--seeds 3] [--extra-sizes 0.125]

RUN_DIR holds soul.h5 and augmented.h5 (a finished `brvo-augment run`). ``--config`` takes fields of
brvo_models.configs.UsefulnessConfig (arms, low_data_fractions, subset_models, tasks, synthetic_filter,
synthetic_labels, synthetic_weight, eval_split, segmenter, forecaster). The low-data arms train a labeller
and a generator per (fraction, seed) with the run's own config (the one stored in augmented.h5) in
RUN_DIR/usefulness/, cached there. One thread per process (torch.set_num_threads(1)): on a shared 2-core
machine more threads per process made training many times slower. The study's verdicts train the low-data arms'
generators per seed (UsefulnessConfig's default ``subset_models: per_seed``); ``shared`` is there for cheaper probes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brvo_models.configs import ForecastRecipe, SegmenterRecipe, UsefulnessConfig  # noqa: E402
from storage.run_dir import RunPaths  # noqa: E402
from tasks.config import PipelineConfig, parse_config  # noqa: E402
from tasks.analyses.usefulness_protocol import (  # noqa: E402
    load_study_data,
    gate_lines,
    mix_settings,
    render_gate,
    render_markdown,
    rows_help,
    rows_help_status,
    run_gate,
    run_protocol,
    run_response,
    run_segmentation,
    usage_advice,
    verdict_lines,
)
from tasks.analyses.usefulness_subsets import PipelineSubsetMaker  # noqa: E402

SEGMENTER_GRID = {"width": (8, 16), "steps": (300, 600)}
FORECAST_GRID = {"width": (8, 16), "steps": (300, 1000), "weight_decay": (1e-4, 1e-2)}


def run_config(run_dir: Path) -> PipelineConfig:
    """The config that made the run (stored in augmented.h5), less the fields this code no longer has
    (a run made before the usefulness protocol recorded usefulness_steps/usefulness_seeds)."""
    with h5py.File(RunPaths.of(run_dir).augmented_h5, "r") as f:
        stored = json.loads(f.attrs["config_json"])
    known = {k: v for k, v in stored.items() if k in PipelineConfig.model_fields and k != "usefulness"}
    for section in ("pix2pix", "crgan"):  # model fields renamed or removed since the run was made
        if isinstance(known.get(section), dict):
            fields = PipelineConfig.model_fields[section].annotation.model_fields
            dropped = sorted(set(known[section]) - set(fields))
            if dropped:
                print(f"run config: {section} fields this code no longer has, left out: {dropped}", flush=True)
            known[section] = {k: v for k, v in known[section].items() if k in fields}
    return parse_config(known)


def _grid(grid: dict) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def tune(run_dir: Path, seeds: int) -> dict:
    """Each grid point trained on real train rows, scored on the real val rows (mean over seeds)."""
    paths = RunPaths.of(run_dir)
    data = load_study_data(paths.augmented_h5, paths.soul_h5)
    train, val = data.real["train"], data.real["val"]
    out: dict[str, list] = {"segmentation": [], "response": []}
    for point in _grid(SEGMENTER_GRID):
        cfg = UsefulnessConfig(segmenter=SegmenterRecipe(**point))
        c0 = time.process_time()
        runs = [run_segmentation(train, val, val, cfg, seed, "cpu") for seed in range(seeds)]
        row = {**point, "val_dice": float(np.mean([r["dice"] for r in runs])),
               "val_cldice": float(np.mean([r["cldice"] for r in runs])),
               "cpu_s_per_run": round((time.process_time() - c0) / seeds, 1)}
        out["segmentation"].append(row)
        print("segmentation", row, flush=True)
    for point in _grid(FORECAST_GRID):
        cfg = UsefulnessConfig(forecaster=ForecastRecipe(**point))
        c0 = time.process_time()
        runs = [run_response(train, val, cfg, seed) for seed in range(seeds)]
        row = {**point, "val_mae": float(np.mean([r["mae"] for r in runs])),
               "val_corr": float(np.mean([r["corr"] for r in runs])),
               "cpu_s_per_run": round((time.process_time() - c0) / seeds, 1)}
        out["response"].append(row)
        print("response", row, flush=True)
    return out


def study(run_dir: Path, config: UsefulnessConfig, device: str = "cpu") -> dict:
    paths = RunPaths.of(run_dir)
    data = load_study_data(paths.augmented_h5, paths.soul_h5)
    pipeline = run_config(run_dir).with_overrides(device=device)
    result = run_protocol(data, config, maker=PipelineSubsetMaker(pipeline), work_dir=paths.usefulness_work,
                          log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True), device=device)
    result["verdicts"] = verdict_lines(result)
    result["rows_help"] = rows_help(result)
    result["rows_help_status"] = rows_help_status(result)
    result["advice"] = usage_advice(result)
    return result


def gate(run_dir: Path, config: UsefulnessConfig, extra_sizes: list[float], device: str = "cpu") -> dict:
    """The learning-curve gate on the run's real rows (soul.h5; no synthetic row is read)."""
    soul = RunPaths.of(run_dir).soul_h5
    data = load_study_data(soul, soul)
    if len(data.synthetic_train):
        raise ValueError(f"{soul} holds synthetic rows; the gate reads real rows only")
    result = run_gate(data, config, extra_fractions=extra_sizes, device=device,
                      log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    return {"gate": result, "config": config.model_dump(mode="json"), "seeds": list(range(config.seeds)),
            "patients": {s: len(r.patients) for s, r in data.real.items()}, "soul_h5": str(soul)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("tune", "study", "gate"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    parser.add_argument("--config", type=str, default="{}", help="JSON fields of UsefulnessConfig")
    parser.add_argument("--extra-sizes", type=float, nargs="*", default=[],
                        help="gate: further shares of the train patients on the real-only curve, e.g. 0.125")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.mode == "tune":
        result = tune(args.run_dir, args.seeds)
    elif args.mode == "gate":
        config = UsefulnessConfig.model_validate({"seeds": args.seeds, **json.loads(args.config)})
        result = gate(args.run_dir, config, args.extra_sizes, args.device)
        print("\n".join(render_gate(result["gate"])))
        print("\n".join(gate_lines({"gate": result["gate"]})))
    else:
        config = UsefulnessConfig.model_validate({"seeds": args.seeds, **json.loads(args.config)})
        result = study(args.run_dir, config, args.device)
        print(render_markdown(result))
        print(f"\nMix: {mix_settings(result)}. Bar 'synthetic rows help': {result['rows_help_status']}. "
              f"{result['advice']}")
    result["wall_s"], result["cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    print(f"wall {result['wall_s']} s, cpu {result['cpu_s']} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
