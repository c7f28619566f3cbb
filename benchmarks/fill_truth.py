"""The fill judged against the truth of the missed visits (a phantom's truth dir).

    brvo-augment phantom SOUL --patients 16 --images-per-visit 1-3 --seed 3 --truth-dir TRUTH
    brvo-augment run SOUL RUN --preset demo
    python benchmarks/fill_truth.py RUN TRUTH [--json OUT.json] [--device cpu]

Reads a finished run (its recorded config, soul.h5, augmented.h5 and the CRGAN checkpoint that
made the samples) and the truth dir the phantom wrote beside the tree; no pipeline step does.
Every filled (patient, stage) is compared with its truth scans, resized to the run's image size
the way preprocess resized the tree (``tasks.preprocess.load_pair``), by
:mod:`brvo_models.fill_truth`: image SSIM/PSNR of the zero-noise estimate (regenerated from the
checkpoint: seed None), of the mean of the K samples and of one sample, beside nearest copy,
neighbour mean, a repeat scan and the oracle; the course in the non-perfusion index and in label
vessel density; the labels' 1-px tolerant Dice and clDice; KID and recall of the accepted samples
against the held-out real images. Interior gaps, gaps after the last visit and before the first
are separate rows. Prints one table per kind, a WARNING per missed bar, and writes JSON
(default RUN/fill_truth.json).

:func:`evaluate_run` is the whole evaluation as a function, for the robustness grid.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brvo_models.fill_truth import (GAP_KINDS, PairInputs, bars, distribution, evaluate_pair,  # noqa: E402
                                    gap_kind, image_features, markdown_table, nearest_observed, summarise)
from brvo_models.phantom.truth import Truth, read_truth  # noqa: E402
from storage.errors import BrvoError  # noqa: E402
from storage.hashing import file_sha256  # noqa: E402
from storage.paired_format import read_arrays, read_meta  # noqa: E402
from storage.run_dir import RunPaths  # noqa: E402


def _observed_by_patient(meta) -> dict[str, set[int]]:
    return {str(pid): {int(s) for s in stages} for pid, stages in meta.groupby("patient_id")["stage"]}


def check_truth_matches(truth: Truth, observed: dict[str, set[int]], filled: set[tuple[str, int]]) -> None:
    """One-line BrvoError unless the truth is this run's phantom: the same patients seen at the same stages,
    and a truth for every filled pair."""
    planned = {str(pid): {int(s) for s in rows.loc[rows["observed"], "stage"]}
               for pid, rows in truth.stages.groupby("patient_id")}
    differ = [pid for pid, stages in observed.items() if planned.get(pid) != stages]
    if differ:
        pid = differ[0]
        raise BrvoError(f"{truth.root} is not this run's phantom: patient {pid} was seen at stages "
                        f"{sorted(observed[pid])} in the run and {sorted(planned.get(pid, set()))} in the truth "
                        f"({len(differ)} patients differ)")
    no_truth = sorted(filled - set(truth.missing_pairs()))
    if no_truth:
        raise BrvoError(f"{truth.root}: no truth for {len(no_truth)} filled pairs, e.g. patient {no_truth[0][0]} "
                        f"stage {no_truth[0][1]}")


def zero_noise_estimates(checkpoint: Path, pairs: list[tuple[str, int]], observed_images: dict, image_size: int,
                         device: str) -> dict[tuple[str, int], np.ndarray]:
    """The model's point estimate (seed None) of each pair, from the patient's observed images as the fill
    sees them (each stage enters as the mean of its images)."""
    from brvo_models.crgan import load_generator
    from brvo_models.crgan_data import to_uint8
    from brvo_models.crgan_sampling import context_from_images, generate_batch

    generator, patient_index, device = load_generator(checkpoint, device, image_size)
    contexts, counts = zip(*(context_from_images(observed_images[pid], image_size) for pid, _ in pairs))
    out = generate_batch(generator, np.stack(contexts), np.stack(counts), [patient_index.get(pid) for pid, _ in pairs],
                         [[stage] for _, stage in pairs], [None] * len(pairs), device)
    return {pair: to_uint8(image[0]) for pair, image in zip(pairs, out)}


def evaluate_run(run_dir: Path, truth_dir: Path, *, device: str = "cpu", log=print) -> dict:
    """Every filled pair of ``run_dir`` against ``truth_dir``: {'summary', 'distribution', 'bars', 'pairs', ...}."""
    from tasks.image_quality import HELD_OUT_SPLITS
    from tasks.preprocess import load_pair
    from tasks.engine.run_record import recorded_config

    t0 = time.perf_counter()
    paths = RunPaths.of(run_dir)
    config = recorded_config(run_dir)
    if config is None:
        raise BrvoError(f"{paths.run_json}: no recorded config; is {run_dir} a finished run?")
    for needed in (paths.soul_h5, paths.augmented_h5, paths.crgan_checkpoint):
        if not needed.exists():
            raise BrvoError(f"{needed} is missing; run the whole flow on {run_dir} first")
    with h5py.File(paths.augmented_h5, "r") as f:
        made_with = f.attrs.get("crgan_sha256")
    if made_with != file_sha256(paths.crgan_checkpoint):
        raise BrvoError(f"{paths.crgan_checkpoint} is not the checkpoint that made {paths.augmented_h5}'s samples "
                        "(sha256 differs); rerun the flow")
    size = config.image_size

    real_meta = read_meta(paths.soul_h5)
    real_images, real_labels = read_arrays(paths.soul_h5)
    meta = read_meta(paths.augmented_h5)
    syn_rows = np.flatnonzero(meta["is_synthetic"].to_numpy(bool))
    syn_meta = meta.iloc[syn_rows].reset_index(drop=True)
    syn_images, syn_labels = read_arrays(paths.augmented_h5, syn_rows)

    observed = _observed_by_patient(real_meta)
    filled = {(str(p), int(s)) for p, s in zip(syn_meta["patient_id"], syn_meta["stage"])}
    truth = read_truth(truth_dir)
    check_truth_matches(truth, observed, filled)
    pairs = sorted(filled, key=lambda x: (int(x[0]) if x[0].isdigit() else 1 << 30, x[0], x[1]))
    log(f"fill_truth: {len(pairs)} filled pairs of {len({p for p, _ in pairs})} patients, {len(syn_meta)} samples, "
        f"{truth.n_repeats} truth scans each, at {size} px")

    by_stage: dict[str, dict[int, np.ndarray]] = {}
    labels_by_stage: dict[str, dict[int, np.ndarray]] = {}
    for (pid, stage), rows in real_meta.groupby(["patient_id", "stage"]).groups.items():
        rows = np.asarray(rows)
        by_stage.setdefault(str(pid), {})[int(stage)] = real_images[rows]
        labels_by_stage.setdefault(str(pid), {})[int(stage)] = real_labels[rows]
    zero = zero_noise_estimates(paths.crgan_checkpoint, pairs, by_stage, size, device)

    rows_out, truth_true_scans = [], {}
    for pid, stage in pairs:
        loaded = [load_pair(str(i), str(lab), size, config.label_resize) for i, lab in truth.scan_paths(pid, stage)]
        order = [truth.true_scan] + [k for k in range(len(loaded)) if k != truth.true_scan]  # the true scan first
        t_images = np.stack([loaded[k][0] for k in order])
        t_labels = np.stack([loaded[k][1] for k in order])
        mine = syn_meta.index[(syn_meta["patient_id"] == pid) & (syn_meta["stage"] == stage)]
        mine = mine[np.argsort(syn_meta.loc[mine, "sample_index"].to_numpy())]
        nearest = nearest_observed(observed[pid], stage)
        row = evaluate_pair(PairInputs(
            patient_id=pid, stage=stage, observed_images=by_stage[pid], observed_labels=labels_by_stage[pid],
            truth_images=t_images, truth_labels=t_labels, samples=syn_images[mine], sample_labels=syn_labels[mine],
            zero_noise=zero[(pid, stage)], true_area=truth.true_area(pid, stage),
            nearest_true_area=truth.true_area(pid, nearest)))
        rows_out.append(row)
        truth_true_scans[(pid, stage)] = t_images[0]
    summary = summarise(rows_out)

    held_out = real_meta["split"].isin(HELD_OUT_SPLITS).to_numpy()
    train = (real_meta["split"] == "train").to_numpy()
    held_out_features = image_features(real_images[held_out], config.seed)
    train_features = image_features(real_images[train], config.seed)
    syn_features = image_features(syn_images, config.seed)
    distributions, ceiling = {}, None
    for kind in [k for k in GAP_KINDS if k in summary] + ["all"]:
        in_kind = np.array([kind == "all" or gap_kind(observed[p], s) == kind
                            for p, s in zip(syn_meta["patient_id"], syn_meta["stage"])])
        accepted = in_kind & syn_meta["accepted"].to_numpy(bool)
        chosen, which = (accepted, "accepted") if accepted.any() else (in_kind, "all (none accepted)")
        kind_pairs = [pair for pair in pairs if kind == "all" or gap_kind(observed[pair[0]], pair[1]) == kind]
        truth_features = image_features(np.stack([truth_true_scans[p] for p in kind_pairs]), config.seed)
        too_few = chosen.sum() < 10 and in_kind.sum() > chosen.sum()
        distributions[kind] = distribution(syn_features[torch.as_tensor(chosen)], held_out_features, train_features,
                                           truth_features, real_vs_real=ceiling,
                                           all_samples_features=syn_features[torch.as_tensor(in_kind)] if too_few
                                           else None)
        ceiling = distributions[kind]["real_vs_real"]
        distributions[kind]["synthetic_rows"] = which
    return {"run_dir": str(run_dir), "truth_dir": str(truth_dir),
            "config": {"preset": config.preset, "image_size": size, "seed": config.seed,
                       "samples_per_missing": config.samples_per_missing, "label_resize": config.label_resize},
            "phantom": truth.config.model_dump(mode="json"), "n_repeats": truth.n_repeats,
            "summary": summary, "distribution": distributions, "bars": bars(summary, distributions),
            "pairs": rows_out, "seconds": round(time.perf_counter() - t0, 2)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from storage.atomic import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("truth_dir", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="where to write the result (default RUN/fill_truth.json)")
    parser.add_argument("--device", default="cpu", help="where the zero-noise estimate is generated (cpu, cuda, auto)")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.truth_dir, device=args.device)
    except BrvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["code_commit"] = _commit()
    print(markdown_table(result["summary"], result["distribution"], result["bars"]))
    for name, bar in result["bars"].items():
        if bar["met"] is not True:
            state = "undefined" if bar["met"] is None else "missed"
            print(f"WARNING: fill_truth bar {name} {state}: {bar['rule']} (value {bar['value']})")
    out = args.json or RunPaths.of(args.run_dir).root / "fill_truth.json"
    write_json_atomic(out, result)
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
