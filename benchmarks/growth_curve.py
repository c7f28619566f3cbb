"""How cost grows: the whole pipeline's wall time and peak memory against patients and image size.

    .venv/bin/python benchmarks/growth_curve.py [--cells 12x64 24x64 53x64 120x64 12x128 ...]
        [--schedule-scale F] [--usefulness-scale U] [--seed S] [--work DIR] [--json OUT]

A *cell* is (patients, image size). For each cell the script writes the built-in phantom with that many
patients (``brvo-augment phantom``, at its own 304 px, once per patient count and seed; reused from
``--work`` when present), then runs the whole augment flow on it (``brvo-augment run --preset demo
--config FILE``) as a subprocess with its own PREFECT_HOME (a temporary Prefect server per cell; a
PREFECT_API_URL in the environment is dropped so every cell starts the same way), and measures:

* wall seconds of the ``run`` command, and report.json's seconds per step;
* peak memory two ways: the largest single process of the command's tree (the kernel's ``ru_maxrss`` from
  ``os.wait4``: exact, but one process) and the sum of RSS over the tree, sampled every 0.5 s (shared
  library pages counted once per process, so an upper bound of what the tree needs together);
* the images: real rows in soul.h5 and synthetic rows in augmented.h5;
* the machine's ``uptime`` before and after, so a loaded machine shows beside its numbers.

Training is most of a demo run and does not grow with the images alone: the adaptive schedules give
``clamp(epochs x steps_per_epoch, min_steps, max_steps)`` optimiser steps (brvo_models.training.Schedule),
so a small dataset still trains ``min_steps``. ``--schedule-scale F`` multiplies every training budget of the
demo preset (Pix2Pix and CRGAN epochs, min_steps and max_steps; the segmenter baseline's steps) so the curve
costs a fraction of full runs; ``--usefulness-scale U`` (default F) does the same to the usefulness step's
segmenter and forecaster steps. Each cell's time is then split into

* training work: each model's optimiser steps x its measured seconds per step (report.json's training
  records: Pix2Pix, CRGAN, the segmenter baseline), plus the usefulness step as a whole (its fits are not
  timed one by one, so all of it counts as training: its evaluation part is scaled with it);
* per-image work: the rest of the steps' seconds (ingest, preprocess, fill, label, score, export, figures,
  image_quality, and the evaluation parts of the pix2pix and crgan steps);
* overhead: wall time outside the steps (interpreter and Prefect start, the flow's bookkeeping).

and the script predicts each cell's time at the demo's own schedule: per-image work + overhead + the full
schedule's planned steps (``Schedule.from_config`` on the cell's train rows) x the measured seconds per step
+ usefulness / U. The planned steps are a budget: early stopping can end a training sooner, so the
prediction is an upper bound for those steps (exact at F = U = 1 when nothing stopped early).

"Grows at most linearly" is judged from the numbers: per image size, for every pair of cells the time per
real image of the larger cell over that of the smaller; the worst (largest) ratio must stay at or below
``1 + GROWTH_TOLERANCE`` (fixed costs make the ratio fall below 1; above 1 means time per image rises with the
images, faster than linear). The same check is applied to the wall time at the scale run, to the per-image
work alone, and to the predicted full-schedule time. A least-squares line time = a + b x images per size is
printed beside it, with the largest residual.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PATIENTS = (12, 24, 53, 120)
SIZES = (64, 128)
#: a pair of cells may cost up to this much more per image (machine noise) and still count as linear
GROWTH_TOLERANCE = 0.10
#: the steps whose report records time optimiser steps; every other step's seconds are per-image work
TRAINED_STEPS = ("pix2pix", "crgan", "usefulness")
RSS_SAMPLE_S = 0.5
MIB = 1024 * 1024


class Cell(NamedTuple):
    patients: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.patients}x{self.size}"


def parse_cell(text: str) -> Cell:
    """'12x64' -> Cell(12, 64): patients x image side in px (a power of two, 32..1024)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"cell {text!r}: write PATIENTSxSIZE, e.g. 12x64")
    patients, size = (int(p) for p in parts)
    if patients < 1:
        raise argparse.ArgumentTypeError(f"cell {text!r}: patients must be at least 1")
    if size < 32 or size > 1024 or size & (size - 1):
        raise argparse.ArgumentTypeError(f"cell {text!r}: image size must be a power of two from 32 to 1024")
    return Cell(patients, size)


# ------------------------------------------------------------------------------------ the schedules


def scale_steps(steps: int, scale: float) -> int:
    """A step or epoch count times ``scale``, at least 1."""
    return max(1, round(steps * scale))


def scaled_config(size: int, schedule_scale: float, usefulness_scale: float) -> dict:
    """The config overlay (a ``--config`` file's content) over the demo preset for one cell: its image size and
    every training budget times its scale (val_every, patience and the rest stay the demo's)."""
    from tasks.config import preset

    demo = preset("demo")

    def schedule(model) -> dict:
        lo = scale_steps(model.min_steps, schedule_scale)
        return {"epochs": scale_steps(model.epochs, schedule_scale), "min_steps": lo,
                "max_steps": max(lo, scale_steps(model.max_steps, schedule_scale))}

    u = demo.usefulness
    return {"image_size": size,
            "pix2pix": schedule(demo.pix2pix),
            "crgan": schedule(demo.crgan),
            "segmenter_steps": scale_steps(demo.segmenter_steps, schedule_scale),
            "usefulness": {"segmenter": {"steps": scale_steps(u.segmenter.steps, usefulness_scale)},
                           "forecaster": {"steps": scale_steps(u.forecaster.steps, usefulness_scale)}}}


def full_schedule_steps(n_train_images: int, n_train_patients: int) -> dict[str, int]:
    """The optimiser steps the demo preset plans on a dataset of this many train rows (Pix2Pix, the segmenter
    baseline) and train patients (CRGAN): what the pipeline's own steps compute, not a copy of the rule."""
    from brvo_models.training import Schedule, steps_per_epoch
    from tasks.config import preset

    demo = preset("demo")
    p, c = demo.pix2pix, demo.crgan
    return {"pix2pix": Schedule.from_config(p, steps_per_epoch(n_train_images, p.batch_size)).total_steps,
            "crgan": Schedule.from_config(c, steps_per_epoch(n_train_patients, c.batch_size, c.repeats)).total_steps,
            "segmenter": int(demo.segmenter_steps)}


# ------------------------------------------------------------------------------------ one cell's numbers


def training_work(report: dict) -> dict[str, dict]:
    """Each timed training of a run: optimiser steps, planned steps, seconds and seconds per step, from
    report.json's records (Pix2Pix and CRGAN ``training``, the segmenter baseline's ``segmenter_params``)."""
    out = {}
    for name, record in (("pix2pix", (report.get("pix2pix") or {}).get("training")),
                         ("crgan", (report.get("crgan") or {}).get("training")),
                         ("segmenter", (report.get("pix2pix") or {}).get("segmenter_params"))):
        if not record:
            raise ValueError(f"report.json has no {name} training record; did the run train it?")
        steps, seconds = int(record["steps"]), float(record["seconds"])
        if steps < 1:
            raise ValueError(f"report.json's {name} record has {steps} steps")
        out[name] = {"steps": steps, "planned_steps": int(record.get("planned_steps", steps)),
                     "seconds": seconds, "s_per_step": seconds / steps}
    return out


def split_time(report: dict, wall_s: float) -> dict:
    """A run's seconds split into training work, per-image work and overhead (see the module docstring)."""
    timings = {k: float(v) for k, v in report["timings_s"].items() if k not in ("total", "cached")}
    if report["timings_s"].get("cached"):
        raise ValueError(f"steps served from cache ({report['timings_s']['cached']}): their times are another run's")
    trained = training_work(report)
    training_s = sum(t["seconds"] for t in trained.values()) + timings.get("usefulness", 0.0)
    steps_s = sum(timings.values())
    return {"steps_s": timings, "training": trained, "usefulness_s": timings.get("usefulness", 0.0),
            "training_s": training_s, "per_image_s": steps_s - training_s, "overhead_s": wall_s - steps_s}


def predict_full(split: dict, n_train_images: int, n_train_patients: int, usefulness_scale: float) -> dict:
    """The cell's time at the demo's own schedule: per-image work and overhead as measured, each training's
    full planned steps x its measured seconds per step, the usefulness step / its scale."""
    full = full_schedule_steps(n_train_images, n_train_patients)
    trainings = {name: full[name] * split["training"][name]["s_per_step"] for name in full}
    usefulness = split["usefulness_s"] / usefulness_scale
    total = split["per_image_s"] + split["overhead_s"] + sum(trainings.values()) + usefulness
    return {"steps": full, "training_s": trainings, "usefulness_s": usefulness, "total_s": total}


# ------------------------------------------------------------------------------------ growth


def linear_fit(images: list[float], seconds: list[float]) -> dict:
    """Least squares seconds = a + b x images; with the largest residual as a share of its cell's time."""
    slope, intercept = statistics.linear_regression(images, seconds)
    worst = max(abs(s - (intercept + slope * n)) / s for n, s in zip(images, seconds))
    return {"a_s": intercept, "b_s_per_image": slope, "worst_residual_share": worst}


def growth_check(images: list[float], seconds: list[float], tolerance: float = GROWTH_TOLERANCE) -> dict:
    """Is time at most linear in images? For every pair of cells with more images in the second, the ratio of
    their times per image; linear (or better) when the worst ratio is at most 1 + ``tolerance``."""
    points = sorted(zip(images, seconds))
    pairs = [(a, b) for a, b in itertools.combinations(points, 2) if b[0] > a[0]]
    if not pairs:
        return {"worst_ratio": None, "pair": None, "verdict": "not checkable: needs two cells with different images"}
    ratio, small, large = max(((b[1] / b[0]) / (a[1] / a[0]), a, b) for a, b in pairs)
    verdict = "at most linear" if ratio <= 1 + tolerance else "FASTER THAN LINEAR"
    return {"worst_ratio": ratio, "pair": [small[0], large[0]], "tolerance": tolerance, "verdict": verdict}


def growth_by_size(cells: list[dict]) -> dict:
    """Per image size: the fit and the growth check of wall time (at the scale run), per-image work and the
    predicted full-schedule time, each against real images."""
    out = {}
    for size in sorted({c["size"] for c in cells}):
        rows = [c for c in cells if c["size"] == size]
        images = [c["images"]["real"] for c in rows]
        entry = {}
        for key, values in (("wall", [c["wall_s"] for c in rows]),
                            ("per_image_work", [c["time"]["per_image_s"] for c in rows]),
                            ("predicted_full", [c["predicted_full"]["total_s"] for c in rows])):
            entry[key] = {"check": growth_check(images, values),
                          "fit": linear_fit(images, values) if len(set(images)) > 1 else None}
        out[str(size)] = entry
    return out


# ------------------------------------------------------------------------------------ running a cell


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def child_env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600", PYTHONUNBUFFERED="1")
    return env


class TreeRss:
    """Samples the sum of RSS over a process and its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int):
        import psutil

        self._root = psutil.Process(pid)
        self._psutil = psutil
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            return 0  # the command has exited
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except self._psutil.NoSuchProcess:
                continue  # exited between listing and reading: it holds no memory now
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(RSS_SAMPLE_S)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


#: Runs the command as its own child and writes that child's ru_maxrss (KiB) to argv[1]. Linux counts the
#: memory a process had before exec in its ru_maxrss, so a command forked straight from this script (torch
#: loaded) would report this script's size; forked from this small launcher it reports its own.
MAXRSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_pid, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], log_path: Path, env: dict | None) -> dict:
    """Run ``argv`` (output to ``log_path``) and measure wall seconds, its tree's sampled RSS peak and its
    largest process's ``ru_maxrss`` (the kernel's, over the command and the children it waited for); a failed
    command raises with the log's last lines."""
    maxrss_path = log_path.with_name(log_path.name + ".maxrss")
    maxrss_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", MAXRSS_LAUNCHER, str(maxrss_path), *argv], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeRss(proc.pid)
        returncode = proc.wait()
        wall = time.perf_counter() - t0
        tree_peak = sampler.stop()
    if returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(argv[1:4])[:80]} exited {returncode}; see {log_path}:\n{tail}")
    # ru_maxrss is in KiB on Linux
    return {"wall_s": wall, "largest_process_rss_mib": int(maxrss_path.read_text()) / 1024,
            "tree_rss_mib": tree_peak / MIB}


def ensure_phantom(work: Path, patients: int, seed: int) -> tuple[Path, float | None]:
    """WORK/phantoms/p<N>_s<S>, written once (at the phantom's own 304 px; preprocess resizes it). Returns the
    directory and the seconds it took (None when reused)."""
    out = work / "phantoms" / f"p{patients}_s{seed}"
    if (out / "S1").is_dir():
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-", dir=work) as home:
        measured = run_measured([sys.executable, "-m", "flows.cli", "phantom", str(out), "--patients", str(patients),
                                 "--seed", str(seed), "--overwrite"],
                                work / "logs" / f"phantom_p{patients}_s{seed}.log", child_env(Path(home)))
    return out, measured["wall_s"]


def run_cell(cell: Cell, work: Path, seed: int, schedule_scale: float, usefulness_scale: float) -> dict:
    """Phantom (reused), then the whole flow with the demo preset at the cell's size and the scaled schedules,
    in a fresh run directory; the cell's measurements and report numbers."""
    from storage.paired_format import validate
    from storage.run_dir import read_report

    (work / "logs").mkdir(parents=True, exist_ok=True)
    phantom, phantom_s = ensure_phantom(work, cell.patients, seed)
    tag = f"p{cell.patients}_s{seed}_{cell.size}px_x{schedule_scale:g}_u{usefulness_scale:g}"
    run_dir = work / "runs" / tag
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own earlier run: a fresh one, or steps would be served from cache
    config = scaled_config(cell.size, schedule_scale, usefulness_scale)
    config["seed"] = seed
    config_path = work / "configs" / f"{tag}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    before = uptime()
    with tempfile.TemporaryDirectory(prefix="prefect-", dir=work) as home:
        measured = run_measured([sys.executable, "-m", "flows.cli", "run", str(phantom), str(run_dir), "--preset",
                                 "demo", "--config", str(config_path)], work / "logs" / f"run_{tag}.log",
                                child_env(Path(home)))
    after = uptime()
    report = read_report(run_dir)
    split = split_time(report, measured["wall_s"])
    real = validate(run_dir / "soul.h5").n_real
    synthetic = validate(run_dir / "augmented.h5").n_synthetic
    p2p, crgan = report["pix2pix"]["training"], report["crgan"]["training"]  # the rows the schedules planned on
    predicted = predict_full(split, int(p2p["n_train"]), int(crgan["n_train_patients"]), usefulness_scale)
    return {"patients": cell.patients, "size": cell.size, "seed": seed, "run_dir": str(run_dir),
            "config_overlay": config, "phantom_s": phantom_s, "uptime_before": before, "uptime_after": after,
            "images": {"real": real, "synthetic": synthetic, "train_rows": int(p2p["n_train"]),
                       "train_patients": int(crgan["n_train_patients"])},
            "device": (report.get("config") or {}).get("device"), **measured, "time": split,
            "predicted_full": predicted}


# ------------------------------------------------------------------------------------ printing


def _f(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _load(uptime_line: str) -> str:
    """'... load average: 1.08, 1.60, 1.50' -> '1.08, 1.60, 1.50'."""
    return uptime_line.split("load average:")[-1].strip()


def _training_cell(cell: dict, name: str) -> str:
    """One training of a cell: steps run (planned at the scale) x seconds per step; full steps -> seconds."""
    t, predicted = cell["time"]["training"][name], cell["predicted_full"]
    return (f"{t['steps']} ({t['planned_steps']}) x {t['s_per_step']:.3f} s; full {predicted['steps'][name]} "
            f"-> {predicted['training_s'][name]:.0f} s")


def print_tables(result: dict) -> None:
    cells = result["cells"]
    scale, uscale = result["schedule_scale"], result["usefulness_scale"]
    print(f"\nschedule scale {scale:g} (Pix2Pix, CRGAN, segmenter baseline), usefulness scale {uscale:g}; "
          f"demo preset otherwise; {result['machine']['cpus']} CPUs, OMP_NUM_THREADS="
          f"{result['machine']['omp_num_threads']}")
    print("\n| cell | real imgs | synthetic | wall s | per-image work s | training s | overhead s "
          "| peak RSS MiB: largest process / tree (sampled) | uptime before -> after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        t = c["time"]
        print(f"| {c['patients']}x{c['size']} | {c['images']['real']} | {c['images']['synthetic']} | {c['wall_s']:.0f} "
              f"| {t['per_image_s']:.0f} | {t['training_s']:.0f} | {t['overhead_s']:.0f} "
              f"| {c['largest_process_rss_mib']:.0f} / {c['tree_rss_mib']:.0f} "
              f"| {_load(c['uptime_before'])} -> {_load(c['uptime_after'])} |")
    steps = list(dict.fromkeys(k for c in cells for k in c["time"]["steps_s"]))
    print("\nseconds per pipeline step (report.json timings_s):\n")
    print("| cell | " + " | ".join(steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for c in cells:
        print(f"| {c['patients']}x{c['size']} | "
              + " | ".join(_f(c["time"]["steps_s"].get(s), ".1f") for s in steps) + " |")
    print("\ntrainings: optimiser steps run (planned at this scale) x seconds per step; "
          "full demo schedule's planned steps; predicted full-schedule time:\n")
    print("| cell | Pix2Pix | CRGAN | segmenter baseline | usefulness s (/ scale) | predicted full s "
          "| of which training s |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        pr = c["predicted_full"]
        training_full = sum(pr["training_s"].values()) + pr["usefulness_s"]
        print(f"| {c['patients']}x{c['size']} | {_training_cell(c, 'pix2pix')} | {_training_cell(c, 'crgan')} "
              f"| {_training_cell(c, 'segmenter')} "
              f"| {c['time']['usefulness_s']:.0f} -> {pr['usefulness_s']:.0f} | {pr['total_s']:.0f} "
              f"| {training_full:.0f} |")
    print(f"\ngrowth against real images, per image size (at most linear: the worst ratio of time per image, "
          f"larger cell over smaller, <= {1 + GROWTH_TOLERANCE:g}):\n")
    print("| px | time | fit a + b x images | worst residual | worst ratio (images) | verdict |")
    print("|---|---|---|---|---|---|")
    for size, entry in result["growth"].items():
        for key, label in (("wall", f"wall at scale {scale:g}"), ("per_image_work", "per-image work"),
                           ("predicted_full", "predicted full schedule")):
            fit, check = entry[key]["fit"], entry[key]["check"]
            fit_text = "n/a" if fit is None else f"{fit['a_s']:.1f} + {fit['b_s_per_image']:.3f} x images"
            resid = "n/a" if fit is None else f"{fit['worst_residual_share']:.0%}"
            pair = "" if check["pair"] is None else f" ({check['pair'][0]} -> {check['pair'][1]})"
            print(f"| {size} | {label} | {fit_text} | {resid} | {_f(check['worst_ratio'], '.2f')}{pair} "
                  f"| {check['verdict']} |")
    for line in growth_warnings(result["growth"]):
        print(f"\nWARNING: {line}")


def growth_warnings(growth: dict) -> list[str]:
    """A line for each time that grows faster than linearly in images, or could not be checked."""
    out = []
    for size, entry in growth.items():
        for key, check in ((k, v["check"]) for k, v in entry.items()):
            if check["worst_ratio"] is None:
                out.append(f"{size} px, {key}: {check['verdict']}")
            elif check["verdict"] != "at most linear":
                out.append(f"{size} px, {key} grows faster than linearly in images: time per image "
                           f"{check['worst_ratio']:.2f}x from {check['pair'][0]} to {check['pair'][1]} real images "
                           f"(the rule allows {1 + check['tolerance']:g}x)")
    return out


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=parse_cell, nargs="+",
                        default=[Cell(p, s) for s in SIZES for p in PATIENTS],
                        help="PATIENTSxSIZE cells (default: 12 24 53 120 patients x 64 128 px)")
    parser.add_argument("--schedule-scale", type=float, default=1.0,
                        help="multiplies the Pix2Pix/CRGAN step budgets and the segmenter baseline's steps")
    parser.add_argument("--usefulness-scale", type=float, default=None,
                        help="multiplies the usefulness step's segmenter and forecaster steps (default: the "
                             "schedule scale); 1 measures that step as the demo runs it")
    parser.add_argument("--seed", type=int, default=0, help="phantom and run seed")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep phantoms, configs, logs and runs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here (after each cell)")
    args = parser.parse_args(argv)
    uscale = args.schedule_scale if args.usefulness_scale is None else args.usefulness_scale
    for name, value in (("--schedule-scale", args.schedule_scale), ("--usefulness-scale", uscale)):
        if not 0 < value <= 10:
            parser.error(f"{name} must be in (0, 10], got {value}")
    work = args.work or Path(tempfile.mkdtemp(prefix="growth-curve-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"schedule_scale": args.schedule_scale, "usefulness_scale": uscale, "seed": args.seed,
                    "growth_tolerance": GROWTH_TOLERANCE,
                    "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                "platform": platform.platform()},
                    "cells": [], "failed": {}}
    for cell in sorted(dict.fromkeys(args.cells), key=lambda c: (c.size, c.patients)):
        print(f"cell {cell.name}: {uptime()}", flush=True)
        try:
            row = run_cell(cell, work, args.seed, args.schedule_scale, uscale)
        except (RuntimeError, ValueError, OSError) as exc:
            result["failed"][cell.name] = str(exc)
            print(f"cell {cell.name} FAILED: {exc}", flush=True)
        else:
            result["cells"].append(row)
            print(f"cell {cell.name}: {row['wall_s']:.0f} s, {row['images']['real']} real + "
                  f"{row['images']['synthetic']} synthetic images, predicted full schedule "
                  f"{row['predicted_full']['total_s']:.0f} s", flush=True)
        result["growth"] = growth_by_size(result["cells"])
        if args.json:
            partial = args.json.with_name(args.json.name + ".partial")
            partial.write_text(json.dumps(result, indent=2) + "\n")
            partial.replace(args.json)
    if args.work is None and not result["failed"]:
        shutil.rmtree(work)
    elif args.work is None:
        print(f"kept {work} for the failed cells' logs")
    if result["cells"]:
        print_tables(result)
    for name, reason in result["failed"].items():
        print(f"\nWARNING: cell {name} failed: {reason.splitlines()[0]}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
