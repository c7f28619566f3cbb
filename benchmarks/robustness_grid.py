"""Robustness grid: the demo recipe on phantoms unlike the demo's, through the product's steps.

    python benchmarks/robustness_grid.py run --data DATA_DIR --out grid.jsonl
        [--patients 12 24 53 120] [--visits 1-2 3-8] [--seeds 0 1] [--sizes 64 128]
        [--device cpu|cuda|auto] [--jobs N] [--threads T] [--models pix2pix crgan]
        [--variant '{"pix2pix": {...}}'] [--val-only]
    python benchmarks/robustness_grid.py prepare --data DATA_DIR [the same selectors] [--jobs N]
    python benchmarks/robustness_grid.py table grid.jsonl [the same selectors]
    python benchmarks/robustness_grid.py select grid_val.jsonl

One *configuration* is (patients, images per visit, image size); each runs on two *seeds*: seed s
makes the phantom (``generate_phantom(seed=s)``), splits its patients (``preprocess``) and trains
the models (``config.seed = s``). Every step is the product's, run by the step engine's driver
(``tasks.engine.run_plan``, as the usefulness sub-runs are) under the same cache rules as any run:

* the dataset, DATA_DIR/<name>/: ``generate_phantom`` (at the phantom's own 304 px, as ``make demo`` makes
  it, once) -> the ``ingest`` and ``preprocess`` steps (resized to the configuration's size), each served
  from its record while nothing it depends on changed;
* the row, a sub-run in DATA_DIR/rows/<name>/<variant and device>: a copy of the dataset's soul.h5 (its
  'preprocess', whose source is the request naming it by sha256), then the ``pix2pix`` step (train, then
  the held-out evaluation: best.pt and its threshold chosen on the val patients; Otsu, Frangi and the
  supervised segmenter scored on the same test images) and the ``crgan`` step (held-out real stages of val
  + test patients against nearest-stage copy and neighbour mean). A row whose steps are served from their
  records says so (``cached_steps``) and keeps the times of the run that computed them.

The config is the demo preset at the configuration's image size (``--variant`` overrides fields, as a
config file would); the schedules are the preset's (adaptive: counted in optimiser steps). Each
(configuration, seed) appends one JSON row to ``--out`` as soon as it finishes, so a stopped grid keeps
what it ran, and ``run`` skips rows already in ``--out``. ``--jobs`` runs that many rows at once, each a
process of this script with ``--threads`` torch threads (a GPU is shared by the jobs).

``table`` prints every configuration of the selected grid, "not run" where ``--out`` has no row, and the
verdict of the rule fixed before any number was seen (docs/robustness-grid.md): a model beats a baseline
on a configuration when its mean over the two seeds is higher on both metrics (Dice and clDice for the
labels, SSIM and PSNR for CRGAN); "every seed" when each seed wins on both too. With one seed run the
verdict says so ("1 seed").

``--val-only`` trains Pix2Pix only and records its validation scores (no test patient is labelled):
the rows ``select`` reads to choose a recipe among ``--variant`` values on validation patients alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PATIENTS = (12, 24, 53, 120)
VISITS = ("1-2", "3-8")
SEEDS = (0, 1)
SIZES = (64, 128)
LABEL_BASELINES = ("otsu", "frangi", "segmenter")
IMAGE_BASELINES = ("nearest", "neighbour_mean")
#: the segmenter with Pix2Pix's flip averaging: shown beside the baselines, never judged as one
SEGMENTER_FLIPPED = "segmenter_flip_averaged"


def quiet(_message: str) -> None:
    """Per-validation log lines would drown the table; the rows carry what matters."""


def dataset_name(patients: int, visits: str, seed: int, size: int, label_resize: str = "nearest") -> str:
    rule = "" if label_resize == "nearest" else f"_labels-{label_resize}"  # names of the nearest-rule datasets kept
    return f"ph{patients}_v{visits}_s{seed}_{size}px{rule}"


#: How long a row waits for another process that is making or using the same run directory.
LOCK_WAIT_S = 6 * 3600.0
REQUEST_DIR = "request"
REQUEST_FILE = "dataset.json"


def _phantom_source(data_dir: Path, patients: int, visits: str, seed: int) -> Path:
    """DATA_DIR/sources/ph<P>_v<V>_s<S>: the phantom at its own (SOUL's 304 px) size, as `make demo` makes it,
    written once; preprocess resizes it, so the 64 and 128 px datasets of a (patients, visits, seed) show the
    same eyes."""
    from brvo_models.phantom.config import phantom_config
    from flows.phantom import generate_phantom

    lo, hi = (int(v) for v in visits.split("-"))
    source = data_dir / "sources" / f"ph{patients}_v{visits}_s{seed}"
    if not (source / "S1").exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        tmp_source = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=source.parent))
        generate_phantom(tmp_source / "phantom", phantom_config(n_patients=patients, seed=seed,
                                                                images_per_visit=(lo, hi)), workers=1)
        if not (source / "S1").exists():
            shutil.rmtree(source, ignore_errors=True)
            (tmp_source / "phantom").rename(source)
        shutil.rmtree(tmp_source, ignore_errors=True)
    return source


def dataset_config(size: int, seed: int, label_resize: str = "nearest", **fields):
    """The demo preset at the configuration's size and seed (one worker: rows run side by side)."""
    from tasks.config import load_config

    return load_config("demo", image_size=size, seed=seed, label_resize=label_resize, workers=1, **fields)


def prepare_dataset_run(data_dir: Path, patients: int, visits: str, seed: int, size: int,
                        label_resize: str = "nearest"):
    """DATA_DIR/<name>/ for this configuration, seed and label rule: the product's ingest and preprocess steps
    run by the step engine (tasks.engine.run_plan) on the phantom, each served from its record while nothing it
    depends on changed. Returns the plan's run (its 'preprocess' result names soul.h5)."""
    from storage.locking import run_dir_lock
    from tasks.engine import StepContext, execute_plainly, run_plan
    from tasks.ingest import INGEST
    from tasks.preprocess import PREPROCESS

    source = _phantom_source(data_dir, patients, visits, seed)
    run_dir = data_dir / dataset_name(patients, visits, seed, size, label_resize)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(run_dir=run_dir, config=dataset_config(size, seed, label_resize), source=source, log=quiet)
    with run_dir_lock(run_dir, timeout_s=LOCK_WAIT_S):
        return run_plan((INGEST, PREPROCESS), ctx, execute=execute_plainly)


def prepare_dataset(data_dir: Path, patients: int, visits: str, seed: int, size: int,
                    label_resize: str = "nearest") -> Path:
    """DATA_DIR/<name>/soul.h5 for this configuration, seed and label rule (:func:`prepare_dataset_run`);
    returns the run directory."""
    run = prepare_dataset_run(data_dir, patients, visits, seed, size, label_resize)
    return Path(run.result("preprocess").path).parent


# ------------------------------------------------------------------------------- a row's sub-run


def write_dataset_request(row_dir: Path, preprocess) -> Path:
    """ROW_DIR/request/dataset.json, the row sub-run's source: the dataset's soul.h5 by path and sha256 and its
    preprocess result. Rewritten only when it changes, so a rebuilt dataset retrains the row and nothing else
    does."""
    from storage.atomic import write_json_atomic

    folder = row_dir / REQUEST_DIR
    blob = {"soul_h5": preprocess.path, "soul_h5_sha256": preprocess.sha256,
            "preprocess": preprocess.model_dump(mode="json")}
    path = folder / REQUEST_FILE
    if not path.is_file() or json.loads(path.read_text()) != blob:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, blob)
    return folder


def dataset_soul_step(ctx):
    """The row sub-run's 'preprocess': a copy of the requested dataset's soul.h5 (checked by sha256)."""
    from storage.atomic import atomic_path
    from storage.hashing import file_sha256
    from tasks.preprocess import PreprocessResult

    blob = json.loads((Path(ctx.source) / REQUEST_FILE).read_text())
    if file_sha256(blob["soul_h5"]) != blob["soul_h5_sha256"]:
        raise RuntimeError(f"{blob['soul_h5']} changed since the row was requested; run the row again")
    with atomic_path(ctx.paths.soul_h5) as tmp:
        shutil.copyfile(blob["soul_h5"], tmp)
    return PreprocessResult.model_validate({**blob["preprocess"], "path": str(ctx.paths.soul_h5)})


def fit_pix2pix_step(ctx, preprocess):
    """'pix2pix_fit' (--val-only rows): Pix2Pix trained as the 'pix2pix' step trains it, no test patient labelled."""
    from tasks.pix2pix import train_pix2pix
    from tasks.shared.trained_model import train_and_evaluate

    return train_and_evaluate(ctx, "pix2pix", train_pix2pix, lambda *_args, **_kw: {}, soul_h5=preprocess.path)


def row_steps(models: list[str], val_only: bool) -> tuple:
    """The row sub-run's plan: its dataset, then the product's training steps (train + held-out evaluation);
    --val-only: Pix2Pix's training alone.

    This file's own two steps are taken from it imported as ``benchmarks.robustness_grid``, so the step engine
    keys them on this file's code and what it imports (run as a script, ``__main__`` has no source to key)."""
    import importlib

    from tasks.crgan import TRAIN_CRGAN
    from tasks.engine import Step
    from tasks.pix2pix import TRAIN_PIX2PIX
    from tasks.preprocess import PreprocessResult
    from tasks.shared.trained_model import TrainedModel

    this = importlib.import_module("benchmarks.robustness_grid")
    dataset = Step(name="preprocess", run=this.dataset_soul_step, result_type=PreprocessResult, reads_source=True,
                   writes=("soul_h5",), description="the dataset's soul.h5, copied into the row's sub-run")
    if val_only:
        return (dataset, Step(name="pix2pix_fit", run=this.fit_pix2pix_step, result_type=TrainedModel,
                              needs=("preprocess",), reads=("soul_h5",), config_fields=TRAIN_PIX2PIX.config_fields,
                              uses_device=True))
    return (dataset,) + tuple(step for step in (TRAIN_PIX2PIX, TRAIN_CRGAN) if step.name in models)


def row_dir_of(data_dir: Path, dataset: str, device: str, variant: dict, val_only: bool) -> Path:
    """DATA_DIR/rows/<dataset>/<variant and device digest>[-val]: one sub-run per row kind, kept as its cache."""
    import hashlib

    digest = hashlib.sha256(json.dumps({"variant": variant, "device": device}, sort_keys=True).encode()).hexdigest()
    return data_dir / "rows" / dataset / (digest[:12] + ("-val" if val_only else ""))


def run_row(data_dir: Path, patients: int, visits: str, seed: int, size: int, *, device: str, models: list[str],
            variant: dict, val_only: bool) -> dict:
    """Train and score one (configuration, seed) with the product's steps, run by the step engine's driver on a
    sub-run directory under the same cache rules as any run (what tasks.analyses.usefulness_subsets does)."""
    import torch

    from storage.locking import run_dir_lock
    from tasks.config import flatten_fields
    from tasks.engine import StepContext, execute_plainly, run_plan

    t0 = time.perf_counter()
    label_resize = variant.get("label_resize", "nearest")
    prepared = prepare_dataset_run(data_dir, patients, visits, seed, size, label_resize)
    row: dict = {"patients": patients, "visits": visits, "seed": seed, "size": size, "variant": variant,
                 "device": device, "val_only": val_only, "prepare_s": round(time.perf_counter() - t0, 1)}
    config = dataset_config(size, seed, **{"device": device, **flatten_fields(variant)})
    row_dir = row_dir_of(data_dir, dataset_name(patients, visits, seed, size, label_resize), device, variant, val_only)
    row_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(row_dir, timeout_s=LOCK_WAIT_S):
        source = write_dataset_request(row_dir, prepared.result("preprocess"))
        ctx = StepContext(run_dir=row_dir, config=config, source=source, log=quiet)
        run = run_plan(row_steps(models, val_only), ctx, execute=execute_plainly)
    row["cached_steps"] = run.cached  # a served step keeps the times of the run that computed it
    for name in ("pix2pix", "pix2pix_fit"):
        if name in run.outcomes:
            trained = run.result(name)
            fit = trained.training
            row["pix2pix_train_s"] = round(fit["seconds"], 1)
            row["pix2pix_fit"] = {"n_train": fit["n_train"], "n_val": fit["n_val"], "steps": fit["steps"],
                                  "planned_steps": fit["planned_steps"], "best_step": fit["best_step"],
                                  "stopped_early": fit["stopped_early"], "val_dice": fit["best_val_dice"],
                                  "val_cldice": fit["best_val_cldice"]}
            if name == "pix2pix":
                section = trained.evaluation
                row["pix2pix_eval_s"] = round(section["seconds"], 1)
                row["labels"] = {"pix2pix": section["test"], **section["baselines"]}
                row["labels_n_test_patients"] = section["n_test_patients"]
                row["threshold"] = section["threshold"]
                row["segmenter_params"] = section.get("segmenter_params")
                flipped = (row["segmenter_params"] or {}).get("flip_averaged_test")
                if flipped:  # for the reader, not a bar: how much Pix2Pix's flip averaging alone would give
                    row["labels"][SEGMENTER_FLIPPED] = flipped
    if "crgan" in run.outcomes:
        trained_c = run.result("crgan")
        fit, section = trained_c.training, trained_c.evaluation
        row["crgan_train_s"] = round(fit["seconds"], 1)
        row["crgan_eval_s"] = round(section["seconds"], 1)
        row["crgan_fit"] = {"steps": fit["steps"], "planned_steps": fit["planned_steps"],
                            "best_step": fit["best_step"], "stopped_early": fit["stopped_early"]}
        heldout = section["heldout"]
        row["images"] = {"crgan": heldout["model"], **heldout["baselines"]}
        row["images_n"] = heldout["n"]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["torch_threads"] = torch.get_num_threads()
    return row


# ------------------------------------------------------------------------------------------ run


def selected(args: argparse.Namespace) -> list[tuple[int, str, int, int]]:
    return [(p, v, s, z) for z in args.sizes for p in args.patients for v in args.visits for s in args.seeds]


def key_of(row: dict) -> tuple:
    return (row["patients"], row["visits"], row["seed"], row["size"], json.dumps(row["variant"], sort_keys=True),
            bool(row.get("val_only")))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one(args: argparse.Namespace) -> int:
    """A single (configuration, seed), run in its own process by ``run``; appends its row to --out."""
    import torch

    torch.set_num_threads(args.threads)
    patients, visits, seed, size = args.cell
    row = run_row(args.data, int(patients), visits, int(seed), int(size), device=args.device, models=args.models,
                  variant=json.loads(args.variant), val_only=args.val_only)
    with open(args.out, "a") as fh:  # one short line per write: appends from several jobs do not interleave
        fh.write(json.dumps(row) + "\n")
    print(summary_line(row), flush=True)
    return 0


def summary_line(row: dict) -> str:
    name = f"{row['patients']} pts {row['visits']}/visit {row['size']} px seed {row['seed']}"
    parts = [name]
    if "pix2pix_fit" in row:
        f = row["pix2pix_fit"]
        parts.append(f"pix2pix {f['steps']} steps (best {f['best_step']}) val {f['val_dice']:.3f}")
    if "labels" in row:
        parts.append("test " + ", ".join(f"{k} {v['dice']:.3f}/{v['cldice']:.3f}" for k, v in row["labels"].items()))
    if "images" in row:
        parts.append(f"crgan {row['crgan_fit']['steps']} steps; " + ", ".join(
            f"{k} {v['ssim']:.3f}/{v['psnr']:.2f}" for k, v in row["images"].items()))
    parts.append(f"{row['wall_s']:.0f} s")
    return " | ".join(parts)


def run(args: argparse.Namespace) -> int:
    args.data.mkdir(parents=True, exist_ok=True)
    variant = json.dumps(json.loads(args.variant), sort_keys=True)
    done = {key_of(r) for r in read_rows(args.out)}
    todo = [c for c in selected(args) if (*c, variant, bool(args.val_only)) not in done]
    # datasets first, one process each at most --jobs at a time, so two jobs never make the same one
    print(f"{len(todo)} of {len(selected(args))} (configuration, seed) rows to run on {args.device}, "
          f"{args.jobs} at a time", flush=True)
    base = [sys.executable, str(Path(__file__).resolve()), "one", "--data", str(args.data), "--out", str(args.out),
            "--device", args.device, "--threads", str(args.threads), "--variant", args.variant,
            "--models", *args.models] + (["--val-only"] if args.val_only else [])
    running: list[tuple[subprocess.Popen, tuple]] = []
    failed = 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            cell = queue.pop(0)
            running.append((subprocess.Popen(base + ["--cell", *map(str, cell)]), cell))
        time.sleep(0.5)
        for proc, cell in list(running):
            if proc.poll() is not None:
                running.remove((proc, cell))
                if proc.returncode:
                    failed += 1
                    print(f"FAILED (exit {proc.returncode}): {dataset_name(cell[0], cell[1], cell[2], cell[3])}",
                          flush=True)
    return 1 if failed else 0


def _prepare_cells(job: tuple) -> list[str]:
    data_dir, cells = job
    return [str(prepare_dataset(Path(data_dir), *cell)) for cell in cells]


def prepare(args: argparse.Namespace) -> int:
    """Make the selected datasets (``--jobs`` at once), so that several ``run`` calls can then share them."""
    from concurrent.futures import ProcessPoolExecutor

    args.data.mkdir(parents=True, exist_ok=True)
    cells = selected(args)
    by_source: dict[tuple, list[tuple]] = {}
    for cell in cells:  # the sizes of one phantom in one process: it is generated once
        by_source.setdefault(cell[:3], []).append(cell)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for made in pool.map(_prepare_cells, [(str(args.data), group) for group in by_source.values()]):
            print(f"datasets ready: {', '.join(made)}", flush=True)
    print(f"{len(cells)} datasets in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------- table


def _mean(rows: list[dict], group: str, name: str, metric: str) -> float:
    return statistics.mean(r[group][name][metric] for r in rows)


def verdict(rows: list[dict], group: str, model: str, baseline: str, metrics: tuple[str, str]) -> str:
    """The rule fixed in advance: the seed mean higher on both metrics; 'every seed' when each seed is too."""
    wins = all(_mean(rows, group, model, m) > _mean(rows, group, baseline, m) for m in metrics)
    every = all(r[group][model][m] > r[group][baseline][m] for r in rows for m in metrics)
    if len(rows) == 1:
        return "yes (1 seed)" if wins else "**no** (1 seed)"
    return ("yes, every seed" if every else "yes") if wins else "**no**"


def table(args: argparse.Namespace) -> int:
    rows = [r for r in read_rows(args.results) if not r.get("val_only")]
    variants = {json.dumps(r["variant"], sort_keys=True) for r in rows}
    if len(variants) > 1:
        print(f"note: {len(variants)} variants in {args.results}; rows of all of them are pooled: {sorted(variants)}")
    by_config: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["seed"] in args.seeds:
            by_config.setdefault((r["patients"], r["visits"], r["size"]), []).append(r)
    print("| patients | imgs/visit | px | seeds run | n train imgs | Pix2Pix steps (best) | Pix2Pix Dice / clDice "
          "| Otsu | Frangi | segmenter | Pix2Pix beats Otsu / Frangi / segmenter | segmenter flip-averaged (not a bar) "
          "| CRGAN steps | CRGAN SSIM / PSNR | nearest | neighbour mean | CRGAN beats nearest / neighbour mean "
          "| wall s per seed |")
    print("|---" * 18 + "|")
    for size in args.sizes:
        for patients in args.patients:
            for visits in args.visits:
                rs = sorted(by_config.get((patients, visits, size), []), key=lambda r: r["seed"])
                head = f"| {patients} | {visits} | {size} |"
                if not rs:
                    print(head + " not run |" + " |" * 14)
                    continue
                cells = [",".join(str(r["seed"]) for r in rs)]
                lab = [r for r in rs if "labels" in r]
                img = [r for r in rs if "images" in r]
                if lab:
                    cells.append(",".join(str(r["pix2pix_fit"]["n_train"]) for r in lab))
                    cells.append(", ".join(f"{r['pix2pix_fit']['steps']} ({r['pix2pix_fit']['best_step']})"
                                           for r in lab))
                    for name in ("pix2pix",) + LABEL_BASELINES:
                        per = " ".join(f"{r['labels'][name]['dice']:.3f}/{r['labels'][name]['cldice']:.3f}"
                                       for r in lab)
                        cells.append(f"{_mean(lab, 'labels', name, 'dice'):.3f} / "
                                     f"{_mean(lab, 'labels', name, 'cldice'):.3f} ({per})")
                    cells.append(" / ".join(verdict(lab, "labels", "pix2pix", b, ("dice", "cldice"))
                                            for b in LABEL_BASELINES))
                    if all(SEGMENTER_FLIPPED in r["labels"] for r in lab):
                        cells.append(f"{_mean(lab, 'labels', SEGMENTER_FLIPPED, 'dice'):.3f} / "
                                     f"{_mean(lab, 'labels', SEGMENTER_FLIPPED, 'cldice'):.3f}")
                    else:
                        cells.append("not recorded")
                else:
                    cells += ["not run"] * 9
                if img:
                    cells.append(", ".join(f"{r['crgan_fit']['steps']} ({r['crgan_fit']['best_step']})" for r in img))
                    for name in ("crgan",) + IMAGE_BASELINES:
                        cells.append(f"{_mean(img, 'images', name, 'ssim'):.3f} / "
                                     f"{_mean(img, 'images', name, 'psnr'):.2f}")
                    cells.append(" / ".join(verdict(img, "images", "crgan", b, ("ssim", "psnr"))
                                            for b in IMAGE_BASELINES))
                else:
                    cells += ["not run"] * 5
                cells.append(", ".join(f"{r['wall_s']:.0f}" for r in rs) + f" ({rs[0].get('device', '?')})")
                print(head + " " + " | ".join(cells) + " |")
    return 0


# --------------------------------------------------------------------------------------- select


def real_gain(candidate: dict[str, float], current: dict[str, float], min_gain: float = 0.01) -> bool:
    """The rule fixed in advance: the mean over datasets of val Dice higher by more than ``min_gain`` AND
    higher on a majority of the datasets. ``candidate``/``current``: dataset -> val Dice (the seed mean)."""
    common = sorted(set(candidate) & set(current))
    if not common:
        return False
    gain = statistics.mean(candidate[d] - current[d] for d in common)
    ups = sum(candidate[d] > current[d] for d in common)
    return gain > min_gain and ups * 2 > len(common)


def select(args: argparse.Namespace) -> int:
    """Choose a recipe among ``--candidates`` (JSON variants, in the order given; the first is the incumbent)
    from their --val-only rows: a candidate replaces the current choice only when :func:`real_gain` says so."""
    rows = [r for r in read_rows(args.results) if r.get("val_only")]
    order = [json.dumps(json.loads(c), sort_keys=True) for c in args.candidates]
    val: dict[str, dict[str, list[float]]] = {v: {} for v in order}
    for r in rows:
        v = json.dumps(r["variant"], sort_keys=True)
        if v not in val:
            continue
        val[v].setdefault(dataset_name(r["patients"], r["visits"], r["seed"], r["size"]), []).append(
            r["pix2pix_fit"]["val_dice"])
    means = {v: {d: statistics.mean(x) for d, x in per.items()} for v, per in val.items()}
    missing = [v for v in order if not means[v]]
    if missing:
        print(f"no --val-only rows for {missing}")
        return 1
    chosen = order[0]
    for v in order:
        m = means[v]
        print(f"{v}: mean val Dice {statistics.mean(m.values()):.4f} over {len(m)} datasets: "
              + ", ".join(f"{d} {x:.3f}" for d, x in sorted(m.items())))
    for v in order[1:]:
        if real_gain(means[v], means[chosen]):
            chosen = v
    print(f"chosen: {chosen}")
    if args.write:
        Path(args.write).write_text(chosen + "\n")
    return 0


# ----------------------------------------------------------------------------------------- main


def _add_selectors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patients", type=int, nargs="+", default=list(PATIENTS))
    p.add_argument("--visits", nargs="+", default=list(VISITS), choices=list(VISITS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score the selected (configuration, seed) rows")
    _add_selectors(r)
    for p in (r, sub.add_parser("one", help="one (configuration, seed); what run starts per job")):
        p.add_argument("--data", type=Path, required=True, help="where the datasets and run directories live")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (the config's device field)")
        p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
        p.add_argument("--models", nargs="+", default=["pix2pix", "crgan"], choices=["pix2pix", "crgan"])
        p.add_argument("--variant", default="{}", help="JSON object of config fields over the demo preset")
        p.add_argument("--val-only", action="store_true", help="train Pix2Pix and record validation scores only")
        if p is r:
            p.add_argument("--jobs", type=int, default=1, help="rows at once, a process each")
        else:
            p.add_argument("--cell", nargs=4, required=True, metavar=("PATIENTS", "VISITS", "SEED", "SIZE"))
    pr = sub.add_parser("prepare", help="make the selected datasets (phantom, ingest, preprocess)")
    _add_selectors(pr)
    pr.add_argument("--data", type=Path, required=True)
    pr.add_argument("--jobs", type=int, default=1)
    t = sub.add_parser("table", help="the markdown table of a results file over the selected grid")
    t.add_argument("results", type=Path)
    _add_selectors(t)
    s = sub.add_parser("select", help="choose a recipe from --val-only rows by the rule fixed in advance")
    s.add_argument("results", type=Path)
    s.add_argument("--candidates", nargs="+", required=True, help="JSON variants, the incumbent first")
    s.add_argument("--write", default=None, help="file to write the chosen variant's JSON to")
    args = parser.parse_args(argv)
    return {"run": run, "one": one, "prepare": prepare, "table": table, "select": select}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
