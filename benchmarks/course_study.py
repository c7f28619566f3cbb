"""The course study: each method's patient courses, population mean and responder calls against the truth.

    brvo-augment phantom SOUL --patients 24 --images-per-visit 1-3 --attendance-follows-response 1 --truth-dir TRUTH
    brvo-augment run SOUL RUN --preset demo
    python benchmarks/course_study.py RUN TRUTH [--seed-run RUN2 ...] [--json OUT.json]

Reads finished runs of one phantom (soul.h5 for the observed visits, augmented.h5 for the
synthetic rows and their ``accepted`` flag) and the truth dir the phantom wrote beside the tree
(the missed visits' truth scans, resized to the run's size as preprocess resized the tree,
``tasks.preprocess.load_pair``). The biomarker is the non-perfusion index of
:mod:`brvo_models.fill_truth`, averaged over a (patient, stage)'s images; label vessel density is
computed beside it. :mod:`brvo_models.course_study` compares the observed visits only, the last
observation carried, neighbour interpolation and the CRGAN fill (accepted rows, all rows); with
``--seed-run`` (the same phantom trained with other seeds) the verdicts follow the declared rule
across seeds (docs/course-study.md). Prints the tables and writes JSON (default RUN/course_study.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brvo_models.course_study import (PatientCourse, across_seeds, markdown_table, patient_table,  # noqa: E402
                                      study)
from brvo_models.fill_truth import non_perfusion_index, vessel_density  # noqa: E402
from brvo_models.phantom.truth import Truth, read_truth  # noqa: E402
from storage.errors import BrvoError  # noqa: E402
from storage.paired_format import read_arrays, read_meta  # noqa: E402
from storage.run_dir import RunPaths  # noqa: E402

BIOMARKERS = {"non_perfusion": (non_perfusion_index, "images"), "vessel_density": (vessel_density, "labels")}


def _pid_order(pid: str):
    return (int(pid) if pid.isdigit() else 1 << 30, pid)


def truth_values(truth: Truth, pairs: list[tuple[str, int]], size: int, label_resize: str) -> dict:
    """biomarker -> {(pid, stage): mean over the pair's truth scans at the run's size}."""
    from tasks.preprocess import load_pair

    out: dict[str, dict] = {b: {} for b in BIOMARKERS}
    for pid, stage in pairs:
        loaded = [load_pair(str(i), str(lab), size, label_resize) for i, lab in truth.scan_paths(pid, stage)]
        stacks = {"images": [x[0] for x in loaded], "labels": [x[1] for x in loaded]}
        for name, (fn, source) in BIOMARKERS.items():
            out[name][(pid, stage)] = float(np.mean([fn(x) for x in stacks[source]]))
    return out


def _means(meta, images, labels, rows_mask=None) -> dict:
    """biomarker -> {(pid, stage): mean over the rows' images (or labels)}."""
    per_row = {name: np.array([fn(x) for x in (images if source == "images" else labels)])
               for name, (fn, source) in BIOMARKERS.items()}
    keep = np.ones(len(meta), bool) if rows_mask is None else rows_mask
    out: dict[str, dict] = {b: {} for b in BIOMARKERS}
    for (pid, stage), idx in meta[keep].groupby(["patient_id", "stage"]).groups.items():
        pos = meta.index.get_indexer(idx)
        for name in BIOMARKERS:
            out[name][(str(pid), int(stage))] = float(per_row[name][pos].mean())
    return out


def load_run(run_dir: Path, truth: Truth, truth_cache: dict | None = None) -> dict[str, list[PatientCourse]]:
    """One run's cohort as PatientCourses, per biomarker. ``truth_cache`` keeps the truth scans' values between
    runs of the same phantom and size (they do not depend on the run)."""
    from tasks.engine.run_record import recorded_config

    paths = RunPaths.of(run_dir)
    config = recorded_config(run_dir)
    if config is None:
        raise BrvoError(f"{paths.run_json}: no recorded config; is {run_dir} a finished run?")
    for needed in (paths.soul_h5, paths.augmented_h5):
        if not needed.exists():
            raise BrvoError(f"{needed} is missing; run the whole flow on {run_dir} first")
    real_meta = read_meta(paths.soul_h5)
    real_images, real_labels = read_arrays(paths.soul_h5)
    meta = read_meta(paths.augmented_h5)
    syn = np.flatnonzero(meta["is_synthetic"].to_numpy(bool))
    syn_meta = meta.iloc[syn].reset_index(drop=True)
    syn_images, syn_labels = read_arrays(paths.augmented_h5, syn)

    observed_stages = {str(p): {int(s) for s in st} for p, st in real_meta.groupby("patient_id")["stage"]}
    planned = {str(p): {int(s) for s in rows.loc[rows["observed"], "stage"]}
               for p, rows in truth.stages.groupby("patient_id")}
    differ = [p for p, st in observed_stages.items() if planned.get(p) != st]
    if differ or set(planned) != set(observed_stages):
        raise BrvoError(f"{truth.root} is not this run's phantom: patient {(differ or ['?'])[0]}'s visits differ "
                        f"between the run and the truth ({len(differ)} patients differ)")
    missed = [pair for pair in truth.missing_pairs() if pair[0] in observed_stages]

    key = (str(truth.root), config.image_size, config.label_resize)
    if truth_cache is not None and key in truth_cache:
        truth_missed = truth_cache[key]
    else:
        truth_missed = truth_values(truth, missed, config.image_size, config.label_resize)
        if truth_cache is not None:
            truth_cache[key] = truth_missed
    observed = _means(real_meta, real_images, real_labels)
    fill_all = _means(syn_meta, syn_images, syn_labels)
    fill_accepted = _means(syn_meta, syn_images, syn_labels, syn_meta["accepted"].to_numpy(bool))

    out: dict[str, list[PatientCourse]] = {}
    for name in BIOMARKERS:
        cohort = []
        for pid in sorted(observed_stages, key=_pid_order):
            seen = {s: observed[name][(pid, s)] for s in sorted(observed_stages[pid])}
            truth_course = [seen[s] if s in seen else truth_missed[name][(pid, s)] for s in range(6)]
            cohort.append(PatientCourse(
                patient_id=pid, truth=truth_course, observed=seen,
                crgan_accepted={s: v for (p, s), v in fill_accepted[name].items() if p == pid},
                crgan_all={s: v for (p, s), v in fill_all[name].items() if p == pid}))
        out[name] = cohort
    return out


def run_study(run_dirs: list[Path], truth_dir: Path, *, log=print) -> dict:
    """:func:`brvo_models.course_study.study` per run and biomarker, and the verdicts across the runs."""
    t0 = time.perf_counter()
    truth = read_truth(truth_dir)
    cache: dict = {}
    per_run = []
    for run_dir in run_dirs:
        from tasks.engine.run_record import recorded_config

        cohorts = load_run(run_dir, truth, cache)
        config = recorded_config(run_dir)
        fill_counts = {"filled_pairs": sum(len(p.crgan_all) for p in cohorts["non_perfusion"]),
                       "pairs_with_accepted": sum(len(p.crgan_accepted) for p in cohorts["non_perfusion"])}
        per_run.append({"run_dir": str(run_dir), "seed": config.seed, "image_size": config.image_size,
                        **fill_counts, "results": {b: study(c) for b, c in cohorts.items()},
                        "observed": {p.patient_id: sorted(p.observed) for p in cohorts["non_perfusion"]}})
        log(f"course_study: {run_dir} (seed {config.seed}): {fill_counts['filled_pairs']} filled pairs, "
            f"{fill_counts['pairs_with_accepted']} with an accepted row")
    verdicts = {b: across_seeds([r["results"][b] for r in per_run]) for b in BIOMARKERS}
    return {"truth_dir": str(truth_dir), "phantom": truth.config.model_dump(mode="json"), "runs": per_run,
            "verdicts_across_seeds": verdicts, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    from storage.atomic import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("truth_dir", type=Path)
    parser.add_argument("--seed-run", type=Path, action="append", default=[],
                        help="another finished run of the same phantom (another training seed); repeatable")
    parser.add_argument("--json", type=Path, default=None, help="where to write (default RUN/course_study.json)")
    args = parser.parse_args(argv)
    try:
        result = run_study([args.run_dir, *args.seed_run], args.truth_dir)
    except BrvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run in result["runs"]:
        for biomarker, res in run["results"].items():
            print(f"## {biomarker} - {run['run_dir']} (seed {run['seed']}, {run['image_size']} px)\n")
            print(markdown_table(res))
    runs = result["runs"]
    print("## non_perfusion - per patient: course MAE over the missed stages (pp)\n")
    print(patient_table([r["results"]["non_perfusion"] for r in runs], [r["seed"] for r in runs], runs[0]["observed"]))
    print("## verdicts across seeds (the declared rule)\n")
    for biomarker, verdicts in result["verdicts_across_seeds"].items():
        for name, measures in verdicts.items():
            print(f"- {biomarker}: {name}: " + ", ".join(f"{m} {v}" for m, v in measures.items()))
    if len(result["runs"]) < 2:
        print("WARNING: course_study: one run only; the verdicts need two training seeds (not enough seeds)")
    out = args.json or RunPaths.of(args.run_dir).root / "course_study.json"
    write_json_atomic(out, result)
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
