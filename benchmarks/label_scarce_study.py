"""The label-scarce study (tasks/analyses/label_scarce.py) on a finished run: scarce labels, not scarce patients.

    # every seed in one process
    python benchmarks/label_scarce_study.py run RUN_DIR --out study.json [--seeds 3] [--fractions 0.1 0.25]
    # or one process per seed (each its own sub-run), then merged
    python benchmarks/label_scarce_study.py run RUN_DIR --only-seeds 1 --out seed1.json
    python benchmarks/label_scarce_study.py merge seed0.json seed1.json seed2.json --out study.json
    # then the learning-curve gate: the labelled rows alone at each share, twice it and the full split
    python benchmarks/label_scarce_study.py gate RUN_DIR study.json --out gated.json

RUN_DIR holds soul.h5 and augmented.h5 (a finished `brvo-augment run`); the sub-runs use the run's own config
(stored in augmented.h5) with ``--subrun-config`` (a partial PipelineConfig overlay, e.g. a shorter Pix2Pix
schedule) and live in ``--work-dir`` (default RUN_DIR/usefulness/label_scarce), one per seed, cached there.
``--config`` takes fields of brvo_models.configs.UsefulnessConfig (the downstream segmenter's recipe, eval split).
One thread per process (torch.set_num_threads(1)), as the usefulness study.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.usefulness_study import run_config  # noqa: E402
from brvo_models.configs import UsefulnessConfig  # noqa: E402
from storage.atomic import write_json_atomic  # noqa: E402
from storage.run_dir import RunPaths  # noqa: E402
from tasks.analyses.label_scarce import (  # noqa: E402
    PipelineLabelScarceMaker,
    apply_gate,
    labelled_curve,
    judge,
    measure_seeds,
    merge_measured,
    render_markdown,
)
from tasks.analyses.usefulness_protocol import load_study_data  # noqa: E402
from tasks.config.schema import flatten_fields  # noqa: E402


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def measure(args: argparse.Namespace) -> dict:
    paths = RunPaths.of(args.run_dir)
    data = load_study_data(paths.augmented_h5, paths.soul_h5)
    config = UsefulnessConfig.model_validate({"seeds": args.seeds, **json.loads(args.config)})
    pipeline = run_config(args.run_dir).with_overrides(device=args.device,
                                                       **flatten_fields(json.loads(args.subrun_config)))
    work_dir = args.work_dir or paths.usefulness_work / "label_scarce"
    maker = PipelineLabelScarceMaker(pipeline, paths.soul_h5, data.real["train"].patients,
                                     data.real["val"].patients, work_dir)
    seeds = args.only_seeds if args.only_seeds is not None else list(range(config.seeds))
    about = {"config": config.model_dump(mode="json"), "subrun_config": json.loads(args.subrun_config),
             "patients": {s: len(r.patients) for s, r in data.real.items()}}
    partial = args.out.with_suffix(".partial.json") if args.out else None  # after every arm: a part `merge` reads
    measured = measure_seeds(data, config, args.fractions, maker, seeds, log=_log, device=args.device,
                             on_progress=(lambda m: write_json_atomic(partial, {"measured": m, **about}))
                             if partial else None)
    return {"measured": measured, **about}


def read_part(path: Path) -> dict:
    """A part written by ``run`` (or its .partial.json; one written before the partial carried the config is the
    bare measurement, made with the default UsefulnessConfig of 3 seeds)."""
    part = json.loads(path.read_text())
    if "measured" not in part:
        part = {"measured": part, "config": UsefulnessConfig(seeds=3).model_dump(mode="json"), "subrun_config": None,
                "patients": None}
    return part


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="measure the arms (every seed, or --only-seeds)")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--out", type=Path, help="write the result JSON here")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--only-seeds", type=int, nargs="+", help="measure these seeds only (merge the parts later)")
    run.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    run.add_argument("--work-dir", type=Path)
    run.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    run.add_argument("--config", default="{}", help="JSON fields of UsefulnessConfig")
    run.add_argument("--subrun-config", default="{}", help="JSON overlay of the sub-runs' PipelineConfig")
    gate = sub.add_parser("gate", help="the learning-curve gate of a judged study: the labelled rows alone at each "
                          "share, twice it and the full split; rewrites its verdicts where real-only is flat")
    gate.add_argument("run_dir", type=Path, help="the run the study was measured on (its soul.h5 and augmented.h5)")
    gate.add_argument("study", type=Path, help="the judged study's JSON (merge --out)")
    gate.add_argument("--out", type=Path, required=True)
    gate.add_argument("--device", default="cpu")
    merge = sub.add_parser("merge", help="merge per-seed parts and judge them")
    merge.add_argument("parts", type=Path, nargs="+")
    merge.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.mode == "gate":
        study = json.loads(args.study.read_text())
        paths = RunPaths.of(args.run_dir)
        config = UsefulnessConfig.model_validate(study["config"])
        gate = labelled_curve(load_study_data(paths.augmented_h5, paths.soul_h5), config, study["fractions"],
                              device=args.device, log=_log)
        result = apply_gate(study, gate)
        print(render_markdown(result))
        result["gate_wall_s"], result["gate_cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
        write_json_atomic(args.out, result)
        return
    if args.mode == "run":
        part = measure(args)
        parts = [part]
    else:
        parts = [read_part(p) for p in args.parts]
    configs = {json.dumps(p["config"], sort_keys=True) for p in parts}
    if len(configs) > 1:
        raise SystemExit("error: the parts were measured with different configs; they cannot be paired")
    result = judge(merge_measured(p["measured"] for p in parts), UsefulnessConfig.model_validate(parts[0]["config"]))
    result.update(parts=[{k: p[k] for k in ("subrun_config", "patients")} for p in parts],
                  measured=merge_measured(p["measured"] for p in parts) if args.mode == "merge" else part["measured"])
    if args.mode == "run":
        result.update(config=part["config"], subrun_config=part["subrun_config"])
    print(render_markdown(result))
    result["wall_s"], result["cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    print(f"wall {result['wall_s']} s, cpu {result['cpu_s']} s")
    if args.out:
        if args.mode == "run":
            args.out.write_text(json.dumps({**part, "result": result}, indent=1))
        else:
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
