"""The 'preprocess' step: ingest's manifest.csv -> RUN_DIR/soul.h5 ('brvo-paired', docs/design.md section 5).

Streamed in chunks over a process pool that decodes, resizes and compresses (memory bounded by the
chunk size, both cores busy), split by patient, resized by ``label_resize``. Why it is shaped like
this: docs/steps.md.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from storage.errors import BrvoError, InputDataError
from storage.hashing import file_sha256
from storage.paired_format import (
    ENCODABLE,
    SPLITS,
    STAGE_NAMES,
    PairedDatasetWriter,
    encode_pair,
    read_meta,
    validate,
)
from storage.run_dir import RunPaths
from tasks.config import LabelResize, PipelineConfig
from tasks.engine.logs import LogFn, run_log
from tasks.shared.progress import ProgressArtifact
from tasks.engine import Step, StepCommand, StepContext
from tasks.shared.workers import reset_signals, worker_context

if TYPE_CHECKING:
    from tasks.ingest import IngestResult

#: manifest columns preprocess needs (ingest writes these plus stage_name, width, height).
MANIFEST_COLUMNS = ("patient_id", "stage", "exam_id", "subset", "image_path", "label_path")
LABEL_THRESHOLD = 127
DEFAULT_CHUNK_SIZE = 32
IN_FLIGHT_PER_WORKER = 4

ProgressFn = Callable[..., None]


class PreprocessResult(BaseModel):
    """Small summary a flow passes on (the data itself stays in ``path``)."""

    path: str
    sha256: str
    n_rows: int
    n_patients: int
    n_skipped_unlabelled: int
    split_rows: dict[str, int]
    split_patients: dict[str, int]
    image_size: int
    compression: str
    seconds: float
    #: cumulative seconds: decode, resize and compress summed over worker processes
    #: (compress is 0 when the parent compresses, e.g. lzf), write (store + close) in the parent.
    timings: dict[str, float]


# ------------------------------------------------------------------------------------ split


def split_patients(
    stage_sets: dict[str, set[int]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Assign every patient to 'train', 'val' or 'test' (pure, deterministic for ``seed``).

    Held-out evaluation hides one observed stage of a test/val patient and regenerates it
    from the others, so test and val patients are drawn from those with at least two
    observed stages (from the rest only when there are too few). Picks are greedy: first
    the patient that adds the most not-yet-covered stages to the split (so test and val span
    every stage the data has), then the seeded random order; a patient is passed over while
    taking them would leave the remaining (training) patients without one of their stages.
    Ties and the fill-up after full coverage follow the seeded order, not "most stages",
    so the long timelines the generators learn late stages from are not all held out.

    Sizes: ``round(n * fraction)``, at least 1 each when the fraction is positive, and at
    least one training patient. Raises :class:`BrvoError` for fewer than 3 patients.
    """
    ids = sorted(stage_sets, key=_natural_key)
    n = len(ids)
    if n < 3:
        raise BrvoError(
            f"only {n} patient(s) with labelled images; a train/val/test split by patient needs at least 3"
            " - add patients to the input"
        )
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise BrvoError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1")
    n_test = _split_size(n, test_fraction)
    n_val = _split_size(n, val_fraction)
    while n_test + n_val > n - 1:  # keep at least one training patient
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    rank = {pid: int(r) for pid, r in zip(ids, np.random.default_rng(seed).permutation(n))}
    stages = {pid: {int(s) for s in stage_sets[pid]} for pid in ids}
    pool = set(ids)
    out: dict[str, str] = {}
    for split, k in (("test", n_test), ("val", n_val)):
        covered: set[int] = set()
        for _ in range(k):
            holders: dict[int, int] = {}
            for pid in pool:
                for s in stages[pid]:
                    holders[s] = holders.get(s, 0) + 1
            eligible = [pid for pid in pool if len(stages[pid]) >= 2] or list(pool)

            def key(pid: str) -> tuple[int, int, int]:
                starves = sum(1 for s in stages[pid] if holders[s] <= 1)
                gain = len(stages[pid] - covered)
                return (starves, -gain, rank[pid])

            best = min(eligible, key=key)
            out[best] = split
            covered |= stages[best]
            pool.remove(best)
    for pid in pool:
        out[pid] = "train"
    return {pid: out[pid] for pid in ids}


def _split_size(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, int(round(n * fraction)))


def _natural_key(pid: str) -> tuple[int, int, str]:
    """Numeric patient ids in numeric order ('2' < '10'), others after them."""
    return (0, int(pid), pid) if pid.isdigit() else (1, 0, pid)


# ---------------------------------------------------------------------------------- decoding


def load_pair(image_path: str, label_path: str, image_size: int,
              label_resize: LabelResize = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair as uint8 (S, S) arrays: antialiased grayscale image, 0/1 label."""
    image, label, _, _ = _load_pair_timed(image_path, label_path, image_size, label_resize)
    return image, label


def resize_label(mask: np.ndarray, size: int, rule: LabelResize = "nearest") -> np.ndarray:
    """A boolean (H, W) vessel mask -> uint8 0/1 (size, size) by ``rule`` (module docstring)."""
    if rule == "nearest":
        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST),
                          dtype=np.uint8)
    coverage = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BOX))
    if rule == "max":
        return (coverage > 1e-6).astype(np.uint8)
    if rule == "area":
        return (coverage >= 0.5 - 1e-6).astype(np.uint8)
    raise ValueError(f"label_resize must be nearest, max or area, got {rule!r}")


def _load_pair_timed(image_path: str, label_path: str, size: int,
                     label_resize: LabelResize = "nearest") -> tuple[np.ndarray, np.ndarray, float, float]:
    t0 = time.perf_counter()
    try:
        img = _open(image_path)
        img.draft("L", (size, size))  # JPEG only: DCT-domain downscale to >= size (no-op otherwise)
        img = img.convert("L") if img.mode != "L" else img
        img.load()
        lab = _open(label_path)
        lab = lab.convert("L") if lab.mode != "L" else lab
        lab_full = np.asarray(lab) > LABEL_THRESHOLD
    except (OSError, ValueError) as exc:  # truncated or corrupt data surfaces at load time
        raise InputDataError(
            f"{image_path} (label {label_path}): cannot decode ({_first_line(exc)}); re-run ingest to quarantine it"
        ) from None
    t1 = time.perf_counter()
    image = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    label = resize_label(lab_full, size, label_resize)
    t2 = time.perf_counter()
    return image, label, t1 - t0, t2 - t1


def _open(path: str) -> Image.Image:
    """Open lazily (so JPEG draft mode can apply); missing or unreadable files are InputDataErrors."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise InputDataError(f"{path}: file listed in manifest.csv is missing; re-run ingest") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputDataError(f"{path}: cannot decode image ({_first_line(exc)}); re-run ingest to quarantine it") from None


@dataclass
class DecodedChunk:
    """What a worker sends back for a chunk of rows: encoded chunk bytes (when the compression
    has a Python encoder, so compression runs in the workers too) or plain arrays, plus timings."""

    n: int
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    image_chunks: list[bytes] | None = None
    label_chunks: list[bytes] | None = None
    decode_s: float = 0.0
    resize_s: float = 0.0
    compress_s: float = 0.0


def _decode_chunk(args: tuple[Sequence[tuple[str, str]], int, str | None, LabelResize]) -> DecodedChunk:
    """Worker: decode, resize and (if possible) compress a chunk of pairs."""
    pairs, size, compression, label_resize = args
    images = np.empty((len(pairs), size, size), np.uint8)
    labels = np.empty((len(pairs), size, size), np.uint8)
    out = DecodedChunk(n=len(pairs))
    for i, (ip, lp) in enumerate(pairs):
        images[i], labels[i], d, r = _load_pair_timed(ip, lp, size, label_resize)
        out.decode_s += d
        out.resize_s += r
    if compression in ENCODABLE:
        t0 = time.perf_counter()
        encoded = [encode_pair(im, lab, compression) for im, lab in zip(images, labels)]
        out.image_chunks = [e[0] for e in encoded]
        out.label_chunks = [e[1] for e in encoded]
        out.compress_s = time.perf_counter() - t0
    else:
        out.images, out.labels = images, labels
    return out


def iter_decoded(
    chunks: Iterable[Sequence[tuple[str, str]]], image_size: int, workers: int, compression: str | None = None,
    label_resize: LabelResize = "nearest",
) -> Iterator[DecodedChunk]:
    """Decoded chunks in input order; with ``workers > 1`` a bounded pipeline over a process pool.

    At most ``IN_FLIGHT_PER_WORKER * workers`` chunks are submitted ahead of the consumer,
    so a slow writer applies back-pressure instead of letting results pile up in memory,
    while a slow chunk at the head does not leave the other workers idle. With a
    ``compression`` that :func:`storage.paired_format.encode_pair` supports, chunks come
    back compressed, so the parent only stores bytes and the workers do all the CPU work.
    """
    if workers <= 1:
        for chunk in chunks:
            yield _decode_chunk((chunk, image_size, compression, label_resize))
        return
    # fork: workers need no re-import (tasks.preprocess imports Prefect, ~1.3 s per spawn) and
    # only run PIL/numpy/zlib, which hold no locks of the parent's threads.
    it = iter(chunks)
    with worker_context().Pool(workers, initializer=reset_signals) as pool:
        pending: deque = deque()
        for chunk in it:
            pending.append(pool.apply_async(_decode_chunk, ((chunk, image_size, compression, label_resize),)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(_decode_chunk, ((nxt, image_size, compression, label_resize),)))
            yield result


# ---------------------------------------------------------------------------------- the step


def preflight_preprocess(run_dir: str | os.PathLike) -> Path:
    """Fail fast, before any work, when ingest has not run; returns the manifest path."""
    manifest = RunPaths.of(run_dir).manifest
    if not manifest.is_file():
        raise InputDataError(f"{manifest}: not found; run ingest first (brvo-augment ingest SOUL_DIR {run_dir})")
    return manifest


def read_manifest(path: Path) -> pd.DataFrame:
    """manifest.csv with ids as strings ('007' stays '007') and '' for a missing label."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: cannot read manifest ({_first_line(exc)}); re-run ingest") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise InputDataError(f"{path}: manifest lacks columns {missing}; re-run ingest")
    stage = pd.to_numeric(df["stage"], errors="coerce")
    bad = df.index[stage.isna() | ~stage.isin(range(len(STAGE_NAMES)))]
    if len(bad):
        raise InputDataError(
            f"{path}: stage {df.loc[bad[0], 'stage']!r} in row {bad[0] + 2} is not 0..5; re-run ingest"
        )
    df["stage"] = stage.astype(int)
    df["subset"] = [s or STAGE_NAMES[st] for s, st in zip(df["subset"], df["stage"])]
    for col in ("image_path", "label_path"):  # relative paths are relative to the run directory
        df[col] = [str(path.parent / p) if p and not os.path.isabs(p) else p for p in df[col]]
    return df


def preprocess(
    run_dir: str | os.PathLike,
    config: PipelineConfig,
    *,
    log: LogFn = run_log,
    on_progress: ProgressFn | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    manifest: str | os.PathLike | None = None,
) -> PreprocessResult:
    """Write RUN_DIR/soul.h5 from ``manifest`` (default RUN_DIR/manifest.csv, checked to exist first); see
    the module docstring for the rules.

    ``workers`` overrides ``config.workers`` (benchmarks); ``chunk_size`` is the number of
    pairs per decoded chunk (memory per chunk: 2 * chunk_size * image_size**2 bytes).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    paths = RunPaths.of(run_dir)
    manifest_path = Path(manifest) if manifest is not None else preflight_preprocess(run_dir)
    source_sha = file_sha256(manifest_path)
    df = read_manifest(manifest_path)

    unlabelled = df["label_path"] == ""
    n_skipped = int(unlabelled.sum())
    if n_skipped:
        log(f"preprocess: skipping {n_skipped} manifest row(s) without a label (the paired format needs one)")
    df = df[~unlabelled]
    if df.empty:
        raise InputDataError(f"{manifest_path}: no rows with a label_path; preprocess needs image/label pairs")

    stage_sets = df.groupby("patient_id")["stage"].agg(lambda s: set(s.tolist())).to_dict()
    assignment = split_patients(stage_sets, config.val_fraction, config.test_fraction, config.seed)
    df = df.assign(split=df["patient_id"].map(assignment), _key=df["patient_id"].map(_natural_key))
    df = df.sort_values(["_key", "stage", "exam_id"], kind="stable").drop(columns="_key").reset_index(drop=True)

    _remove_stale_temp_files(paths.soul_h5, log)
    size = int(config.image_size)
    n = len(df)
    pairs = list(zip(df["image_path"], df["label_path"]))
    n_workers = max(1, min(int(config.workers if workers is None else workers), n))
    chunks = _even_chunks(pairs, int(chunk_size), n_workers)
    log(f"preprocess: {n} pairs of {len(assignment)} patients -> {paths.soul_h5} at {size} px, "
        f"{n_workers} decoding process(es), compression {config.compression}, labels resized by "
        f"{config.label_resize}")

    attrs = {
        "description": (
            f"SOUL-layout BRVO OCTA en-face images with vessel labels, preprocessed by brvo-augment: "
            f"{n} real image/label pairs of {len(assignment)} patients at {size} px, split by patient"
        ),
        "config_json": config.to_json(),
        "source_sha256": source_sha,
        "split_seed": int(config.seed),
        "n_skipped_unlabelled": n_skipped,
    }
    timings = {"decode_s": 0.0, "resize_s": 0.0, "compress_s": 0.0, "write_s": 0.0}
    done = 0
    with PairedDatasetWriter(paths.soul_h5, size, compression=config.compression, attrs=attrs) as writer:
        for chunk in iter_decoded(chunks, size, n_workers, config.compression, config.label_resize):
            rows = df.iloc[done : done + chunk.n]
            meta = {
                "patient_id": rows["patient_id"].tolist(),
                "stage": rows["stage"].tolist(),
                "exam_id": rows["exam_id"].tolist(),
                "subset": rows["subset"].tolist(),
                "split": rows["split"].tolist(),
                "is_synthetic": [False] * chunk.n,
                "label_source": ["annotation"] * chunk.n,
            }
            t0 = time.perf_counter()
            if chunk.image_chunks is not None:
                writer.append_encoded(chunk.image_chunks, chunk.label_chunks, meta)
            else:
                writer.append(chunk.images, chunk.labels, meta)
            timings["write_s"] += time.perf_counter() - t0
            for k in ("decode_s", "resize_s", "compress_s"):
                timings[k] += getattr(chunk, k)
            done += chunk.n
            if on_progress is not None:
                on_progress(done, n)
        t0 = time.perf_counter()
    timings["write_s"] += time.perf_counter() - t0  # close(): meta, attributes, fsync, rename

    per_split = {s: int((df["split"] == s).sum()) for s in SPLITS}
    patients = {s: sum(1 for v in assignment.values() if v == s) for s in SPLITS}
    seconds = time.perf_counter() - t_start
    result = PreprocessResult(
        path=str(paths.soul_h5),
        sha256=file_sha256(paths.soul_h5),
        n_rows=n,
        n_patients=len(assignment),
        n_skipped_unlabelled=n_skipped,
        split_rows=per_split,
        split_patients=patients,
        image_size=size,
        compression=config.compression,
        seconds=round(seconds, 3),
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    log(f"preprocess: wrote {n} pairs in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} pairs/s); "
        f"patients train/val/test {patients['train']}/{patients['val']}/{patients['test']}")
    return result


def _even_chunks(items: list, chunk_size: int, workers: int) -> list[list]:
    """At most ``chunk_size`` items per chunk, in a number of chunks divisible by ``workers``
    and of near-equal sizes, so no worker is left with a lone tail chunk at the end."""
    n_chunks = -(-len(items) // max(1, chunk_size))
    n_chunks = -(-n_chunks // workers) * workers
    bounds = np.linspace(0, len(items), n_chunks + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _remove_stale_temp_files(target: Path, log: LogFn) -> None:
    """A killed run leaves ``.soul.h5.tmp-*`` beside the target (never at it): clean those up."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        log(f"preprocess: removing {stale.name}, left by an interrupted run")
        stale.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------- inspect


def inspect_dataset(path: str | os.PathLike, deep: bool = False) -> str:
    """Validate a 'brvo-paired' file and summarise it: counts per split and stage, size, provenance.
    ``deep`` also reads every image chunk (see :func:`storage.paired_format.validate`)."""
    summary = validate(path, deep=deep)
    meta = read_meta(path)
    a = summary.attrs
    syn = meta["is_synthetic"].astype(bool)
    lines = [
        f"{summary.path}: {a.get('format')} v{a.get('format_version')}, {summary.n} rows "
        f"({summary.n_real} real, {summary.n_synthetic} synthetic), {summary.image_size}x{summary.image_size} px",
        f"compression {a.get('compression', '?')}, created {a.get('created_utc', '?')}, "
        f"code_version {a.get('code_version', '?')}",
    ]
    if a.get("description"):
        lines.append(f"description: {a['description']}")
    if a.get("source_sha256"):
        lines.append(f"source_sha256: {a['source_sha256']}")
    lines.append("")
    by_split = pd.DataFrame({
        "patients": meta.groupby("split")["patient_id"].nunique(),
        "real": meta[~syn].groupby("split").size(),
        "synthetic": meta[syn].groupby("split").size(),
    }).reindex([s for s in SPLITS if s in set(meta["split"])]).fillna(0).astype(int)
    by_split.index.name = "split"
    lines.append(by_split.to_string())
    lines.append("")
    by_stage = pd.DataFrame({
        "name": list(STAGE_NAMES),
        "patients": meta[~syn].groupby("stage")["patient_id"].nunique().reindex(range(6)).fillna(0).astype(int),
        "real": meta[~syn].groupby("stage").size().reindex(range(6)).fillna(0).astype(int),
        "synthetic": meta[syn].groupby("stage").size().reindex(range(6)).fillna(0).astype(int),
    }, index=range(6))
    if "accepted" in meta and syn.any():
        by_stage["accepted"] = meta[syn & meta["accepted"].astype(bool)].groupby("stage").size().reindex(range(6)).fillna(0).astype(int)
    by_stage.index.name = "stage"
    lines.append(by_stage.to_string())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the step


def preprocess_step(ctx: StepContext, ingest: IngestResult) -> PreprocessResult:
    """The 'preprocess' step: ingest's manifest.csv -> RUN_DIR/soul.h5."""
    progress = ProgressArtifact("preprocess-progress", "pairs decoded and written to soul.h5")
    return preprocess(ctx.run_dir, ctx.config, log=ctx.log, on_progress=progress, manifest=ingest.paths["manifest"])


PREPROCESS = Step(
    name="preprocess", run=preprocess_step, result_type=PreprocessResult, needs=("ingest",), retries=1,
    command=StepCommand("preprocess", "manifest.csv -> RUN_DIR/soul.h5",
                        preflight=lambda ctx: preflight_preprocess(ctx.run_dir)),
    reads=("manifest",), writes=("soul_h5",),
    config_fields=("image_size", "label_resize", "compression", "val_fraction", "test_fraction", "seed"),
    description="manifest.csv -> soul.h5: resized pairs, split by patient")
