"""The 'ingest' step: a SOUL directory or a clinic's manifest CSV -> a checked list of image/label pairs.

Writes manifest.csv (the pairs every later step trusts), quarantine.csv (each rejected file and why),
stage_counts.csv and ingest.json. A bad file is quarantined with its reason and never costs a valid
neighbour. The decisions it makes (pixel formats, sizes, duplicates, hidden files, symlinks, unread
folders, pairing) are listed in docs/steps.md.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from storage.atomic import atomic_path, write_json_atomic, write_text_atomic
from storage.errors import InputDataError
from storage.manifest import read_manifest_table, resolve_listed_path
from storage.paired_format import STAGE_NAMES
from storage.run_dir import RunPaths, ensure_inside, safe_component
from tasks.config import InputSanityConfig
# files above DEFAULT_MAX_FILE_MB are quarantined before anything is read (an 8 GB file must not fail the
# ingest); images whose header declares more than DEFAULT_MAX_MEGAPIXELS before decoding (SOUL: 0.09 Mpx)
from tasks.config.schema import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS
from tasks.engine.logs import run_log
from tasks.engine import Step, StepCommand, StepContext

MANIFEST_COLUMNS = ("patient_id", "stage", "stage_name", "exam_id", "subset",
                    "image_path", "label_path", "width", "height")
QUARANTINE_COLUMNS = ("path", "reason")
CLINICAL_FILES = ("infomation.xlsx", "information.xlsx")  # 'Infomation' (sic) is SOUL's spelling
CLINICAL_SHEETS = ("basic_info", "image_info")
SYSTEM_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx",
                "$recycle.bin", "system volume information"}
NAME_RE = re.compile(r"^(?P<pid>\d+)_(?P<exam>[^\s]+?)\.(?:jpe?g|png|bmp|tiff?)$", re.IGNORECASE)
LUMA_MODES = {"1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_IMAGE_DIRS = ("image", "images", "img")
_LABEL_DIRS = ("label", "labels", "mask", "masks")
_STAGE_LIKE = re.compile(r"^s\d+(t\d+)?$", re.IGNORECASE)  # S4, s1t3: meant as SOUL's, so never ignored silently


class IngestResult(BaseModel):
    """What ingest found; the same figures are in RUN_DIR/ingest.json."""

    source: str
    source_kind: str  # 'soul' or 'manifest'
    n_images: int
    n_patients: int
    n_quarantined: int
    n_skipped_hidden: int
    counts: dict[str, dict[str, int]]  # patient_id|'total' -> {stage_name..., 'total'}
    per_stage: dict[str, dict[str, int]]  # stage_name -> {'patients', 'images'}
    duplicates: list[dict[str, str]]  # kept, dropped, kept_stage, dropped_stage, why
    conversions: list[dict[str, str]]  # path, mode, action[, converted_path]
    warnings: list[str]
    clinical: dict
    paths: dict[str, str]
    elapsed_s: float

    def output_files(self) -> list[Path]:
        """Files converted to 8-bit gray under RUN_DIR/converted (the manifest points at them)."""
        return [Path(c["converted_path"]) for c in self.conversions if c.get("converted_path")]


# ---------------------------------------------------------------------------- bookkeeping

@dataclass
class _Pair:
    patient_id: str
    stage: int
    exam_id: str
    image: Path
    label: Path | None
    origin: str = ""  # 'manifest line N' for manifest input, for messages
    exam_is_id: bool = True  # False when a manifest gave no exam id and the file stem stands in


@dataclass
class _Probe:
    ok: bool
    reason: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    sha1: str = ""
    label_max: int = 255
    grey_range: int = 0  # max - min grey level on the 8-bit scale preprocess sees
    density: float = 0.0  # share of pixels a label would mark as vessel (above 127; nonzero for 16-bit)


@dataclass
class _Acc:
    real_root: str | None = None
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    hidden: int = 0
    warnings: list[str] = field(default_factory=list)

    def reject(self, path: Path | str, reason: str) -> None:
        self.quarantine.append((str(path), reason))


def _natural(value: str) -> tuple:
    return (0, int(value), value) if value.isdigit() else (1, 0, value)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("~$") or name.lower() in SYSTEM_NAMES


def _inside(target: str, real_root: str) -> bool:
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def _symlink_problem(link: str, directory: Path, real_root: str) -> str:
    """Why the symlink ``link`` (an entry of ``directory``) is not followed, or '' when it may be.

    A link to the folder that holds it, or to any folder above it, would make every walk of
    the tree endless (``ln -s . S1/self``); a link that resolves to itself (``ln -s self
    S1/self``) has no target at all. Both are loops: reported, never followed.
    """
    shown = os.readlink(link)
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"symlink loop (-> {shown}): it resolves to itself, not followed"
        return f"broken symlink (-> {shown})"
    target = os.path.realpath(link)
    if not _inside(target, real_root):
        return f"symlink pointing outside the root, not followed (-> {target})"
    if os.path.isdir(target) and _inside(os.path.realpath(directory), target):
        return f"symlink loop (-> {shown}): points at a folder that holds it, not followed"
    return ""


def _list(directory: Path, acc: _Acc | None, real_root: str) -> list[tuple[str, Path, bool]]:
    """Visible entries of ``directory`` as (name, path, is_dir); records hidden/symlink cases in ``acc``."""
    out = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        if acc is not None:
            acc.reject(directory, f"cannot list folder ({exc.strerror or exc})")
        return out
    for entry in entries:
        if _is_hidden(entry.name):
            if acc is not None:
                acc.hidden += 1
            continue
        if entry.is_symlink():
            problem = _symlink_problem(entry.path, directory, real_root)
            if problem:
                if acc is not None:
                    acc.reject(entry.path, problem)
                continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        out.append((entry.name, Path(entry.path), is_dir))
    return out


# ---------------------------------------------------------------------------- locating the input

def _layout(root: Path, real_root: str, acc: _Acc | None = None) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """(top-level folders, S1..S3's folders), each by lower-case name."""
    top = {n.lower(): p for n, p, d in _list(root, acc, real_root) if d}
    groups = {g: {n.lower(): p for n, p, d in _list(top[g], acc, real_root) if d}
              for g in ("s1", "s2", "s3") if g in top}
    return top, groups


def _subset_dirs(root: Path, real_root: str, acc: _Acc | None = None) -> dict[int, Path]:
    """stage -> subset folder: <root>/S<k>/s<k>t<j> (SOUL), or <root>/s<k>t<j> directly; names case-blind."""
    top, groups = _layout(root, real_root, acc)
    found: dict[int, Path] = {}
    for stage, name in enumerate(STAGE_NAMES):
        sub = groups.get(name[:2], {}).get(name) or top.get(name)
        if sub is not None:
            found[stage] = sub
    return found


def _soul_root(source: Path) -> Path:
    """The folder holding S1..S3: ``source`` itself or the one subfolder of it that holds them."""
    if not source.exists():
        raise InputDataError(f"input {source} does not exist; give the SOUL folder (holding S1, S2, S3) "
                             "or a manifest CSV")
    if not source.is_dir():
        raise InputDataError(f"input {source} is neither a folder nor a manifest CSV")
    real = os.path.realpath(source)
    visible = _list(source, None, real)
    if not visible:
        raise InputDataError(f"input folder {source} is empty; point it at the SOUL folder holding S1, S2, S3")
    if _subset_dirs(source, real):
        return source
    souls = [p for _, p, d in visible if d and _subset_dirs(p, real)]
    if len(souls) == 1:
        return souls[0]
    if len(souls) > 1:
        raise InputDataError(f"{source} holds several SOUL trees ({', '.join(p.name for p in souls[:4])}); "
                             "point at one of them")
    names = ", ".join(sorted(n for n, _, _ in visible)[:8])
    raise InputDataError(f"{source} does not look like SOUL: no S1/s1t1 ... S3/s3t2 folders (found: {names}); "
                         "point at the folder holding S1, S2, S3, or give a manifest CSV")


def check_source(source: Path) -> None:
    """Cheap preflight for the CLI: raise InputDataError unless ``source`` is a SOUL root or a readable manifest."""
    source = Path(source).expanduser().absolute()
    if source.is_file():
        read_manifest_table(source)
    else:
        _soul_root(source)


# ---------------------------------------------------------------------------- SOUL scan

def _scan_kind(kind_dir: Path | None, kind: str, acc: _Acc) -> dict[tuple[str, str], tuple[Path, str]]:
    """(patient folder, file stem) -> (path, exam_id) for one image/ or label/ folder."""
    found: dict[tuple[str, str], tuple[Path, str]] = {}
    if kind_dir is None:
        return found
    for name, path, is_dir in _list(kind_dir, acc, acc.real_root):
        if not is_dir:
            acc.reject(path, f"file outside a patient folder (expected {kind}/<pid>/<pid>_<examid>.jpg)")
            continue
        files = _list(path, acc, acc.real_root)
        if not name.isdigit():
            for _, fpath, _ in files or [(name, path, True)]:
                acc.reject(fpath, f"patient folder '{name}' is not a numeric patient id")
            continue
        for fname, fpath, fdir in files:
            if fdir:
                acc.reject(fpath, "unexpected folder inside a patient folder")
                continue
            match = NAME_RE.match(fname)
            if not match:
                acc.reject(fpath, f"unparseable file name (expected {name}_<examid>.jpg)")
                continue
            if int(match["pid"]) != int(name):
                acc.reject(fpath, f"patient id {match['pid']} in the file name disagrees with its folder {name}")
                continue
            key = (name, Path(fname).stem)
            if key in found:
                acc.reject(fpath, f"same exam id as {found[key][0]} in the same folder")
                continue
            found[key] = (fpath, match["exam"])
    return found


def _files_below(folder: Path, acc: _Acc) -> list[Path]:
    """Every visible file under ``folder``; each real folder is listed once, so linked folders cannot loop."""
    files: list[Path] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        for _, path, is_dir in _list(current, acc, acc.real_root):
            (stack if is_dir else files).append(path)
    return sorted(files)


def _set_aside(folder: Path, acc: _Acc, reason: str) -> None:
    """Quarantine every file under a folder ingest does not read (the folder itself when it holds none)."""
    for path in _files_below(folder, acc) or [folder]:
        acc.reject(path, reason)


def _unread_stage_reason(name: str, parent: str, read: dict[str, Path]) -> str:
    low = name.lower()
    if low in read:
        return f"a second {low} folder ({name}); {read[low]} is the one read"
    if low in STAGE_NAMES:
        return f"stage folder {name} under {parent}; it belongs under {low[:2].upper()}/"
    return f"unknown stage folder {name}; expected s1t1..s3t2"


def _report_unread_folders(root: Path, subsets: dict[int, Path], acc: _Acc) -> None:
    """Quarantine what sits where ingest does not look, so no pair vanishes without a row saying why.

    Under S1..S3 that is every folder other than its stage folders (``S1/s1t3``, a misplaced
    ``S1/s2t1``) and every loose file; at the top, folders named like a stage group or stage
    (``S4``, ``s1t3``) that were not read. Other top-level folders are not SOUL's, and left alone.
    Symlink problems were reported when the stage folders were found.
    """
    read = {STAGE_NAMES[stage]: path for stage, path in subsets.items()}
    used = set(read.values())
    top, groups = _layout(root, acc.real_root)
    group_dirs = {top[g] for g in groups}
    for name, path, is_dir in _list(root, None, acc.real_root):
        if is_dir and path not in used and path not in group_dirs and _STAGE_LIKE.match(name):
            _set_aside(path, acc, _unread_stage_reason(name, root.name, read))
    for group_dir in sorted(group_dirs):
        for name, path, is_dir in _list(group_dir, None, acc.real_root):
            if path in used:
                continue
            if is_dir:
                _set_aside(path, acc, _unread_stage_reason(name, group_dir.name, read))
            else:
                acc.reject(path, f"file outside a stage folder (expected {group_dir.name}/<stage>/image/<pid>/...)")


def _scan_soul(root: Path, acc: _Acc) -> list[_Pair]:
    pairs: list[_Pair] = []
    subsets = _subset_dirs(root, acc.real_root, acc)
    _report_unread_folders(root, subsets, acc)
    for stage, name in enumerate(STAGE_NAMES):
        if stage not in subsets:
            acc.warnings.append(f"subset {name} not found under {root}")
            continue
        entries = _list(subsets[stage], acc, acc.real_root)
        kinds = {n.lower(): p for n, p, d in entries if d}
        image_dir = next((kinds[k] for k in _IMAGE_DIRS if k in kinds), None)
        label_dir = next((kinds[k] for k in _LABEL_DIRS if k in kinds), None)
        if image_dir is None:
            acc.warnings.append(f"subset {name} has no image/ folder")
        for entry_name, path, is_dir in entries:
            if path in (image_dir, label_dir):
                continue
            if is_dir:
                _set_aside(path, acc, f"unknown folder {entry_name} in {name}; expected one image/ and one label/")
            else:
                acc.reject(path, f"file outside image/ and label/ (expected {name}/image/<pid>/<pid>_<examid>.jpg)")
        images = _scan_kind(image_dir, "image", acc)
        labels = _scan_kind(label_dir, "label", acc)
        for key in sorted(images.keys() | labels.keys()):
            if key not in labels:
                acc.reject(images[key][0], f"image without label (no {name}/label/{key[0]}/{key[1]}.*)")
            elif key not in images:
                acc.reject(labels[key][0], f"label without image (no {name}/image/{key[0]}/{key[1]}.*)")
            else:
                pairs.append(_Pair(key[0], stage, images[key][1], images[key][0], labels[key][0]))
    return pairs


# ---------------------------------------------------------------------------- manifest input

def _parse_stage(value: str) -> int | None:
    text = value.strip().lower()
    if text in STAGE_NAMES:
        return STAGE_NAMES.index(text)
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() and 0 <= number <= 5 else None


def _scan_manifest(csv_path: Path, acc: _Acc) -> list[_Pair]:
    table = read_manifest_table(csv_path)
    has_label, has_exam = "label_path" in table.columns, "exam_id" in table.columns
    pairs: list[_Pair] = []
    for i, row in enumerate(table.to_dict("records")):
        where = f"manifest line {i + 2}"
        raw_image = row["image_path"].strip()
        raw_label = row.get("label_path", "").strip() if has_label else ""
        image, label = resolve_listed_path(csv_path, raw_image), resolve_listed_path(csv_path, raw_label)
        culprits = [p for p in (image, label) if p is not None] or [f"{csv_path}:{i + 2}"]
        pid, stage = row["patient_id"].strip(), _parse_stage(row["stage"])
        problem = None
        if image is None:
            problem = "empty image_path"
        elif not pid:
            problem = "empty patient_id"
        elif stage is None:
            problem = f"unknown stage '{row['stage']}' (use 0..5 or {', '.join(STAGE_NAMES)})"
        if problem:
            for p in culprits:
                acc.reject(p, f"{where}: {problem}")
            continue
        missing = [p for p in (image, label) if p is not None and not p.is_file()]
        if missing:
            for p in culprits:
                why = "file not found" if p in missing else f"its {'label' if p == image else 'image'} is missing"
                acc.reject(p, f"{where}: {why}")
            continue
        exam = row.get("exam_id", "").strip() if has_exam else ""
        is_id = bool(exam)
        if not exam:  # SOUL-style '<pid>_<exam>' names carry the exam id; other stems are only names
            match = re.match(r"^(\d+)_(.+)$", image.stem)
            is_id = bool(match and match[1] == pid)
            exam = match[2] if is_id else image.stem
        pairs.append(_Pair(pid, stage, exam, image, label, origin=where, exam_is_id=is_id))
    return pairs


# ---------------------------------------------------------------------------- decoding

def _short(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or corrupt format)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def _probe(path: Path, max_file_mb: float = DEFAULT_MAX_FILE_MB,
           max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> _Probe:
    """Check size and header, then decode ``path`` fully (PIL releases the GIL while decoding,
    so threads use both cores). Nothing larger than the caps is read into memory."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return _Probe(False, f"cannot read file ({exc.strerror or exc})")
    if size == 0:
        return _Probe(False, "empty file (0 bytes)")
    if size > max_file_mb * 1e6:
        return _Probe(False, f"file is {size / 1e6:.1f} MB, over the ingest cap of {max_file_mb:g} MB "
                             f"(raise the config's max_file_mb if such images are real)")
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except Exception as exc:  # an unreadable header means the file is unusable; the reason goes to quarantine
        return _Probe(False, f"cannot decode image: {_short(exc)}")
    if width * height > max_megapixels * 1e6:
        return _Probe(False, f"image is {width}x{height} ({width * height / 1e6:.0f} Mpx), over the ingest cap of "
                             f"{max_megapixels:g} Mpx (raise the config's max_megapixels if such images are real)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Probe(False, f"cannot read file ({exc.strerror or exc})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, (width, height) = im.mode, im.size
            if mode in INT_MODES:
                pixels = np.asarray(im)
                vessel = pixels > 0  # as _to_8bit converts a 16-bit label
            elif mode in LUMA_MODES:
                pixels = np.asarray(im if mode == "L" else im.convert("L"))
                vessel = pixels > 127  # as preprocess binarises a label
            else:
                return _Probe(False, f"unsupported pixel mode {mode} (save as 8-bit grayscale)")
            top, low = int(pixels.max()), int(pixels.min())
    except Exception as exc:  # any decoder failure means the file is unusable; the reason goes to quarantine
        return _Probe(False, f"cannot decode image: {_short(exc)}")
    if mode in INT_MODES and top > 65535:
        return _Probe(False, f"pixel values up to {top} do not fit 16 bits")
    scale = 255.0 / 65535.0 if mode in INT_MODES and top > 255 else 1.0  # as _to_8bit scales a 16-bit image
    return _Probe(True, mode=mode, width=width, height=height, sha1=hashlib.sha1(data).hexdigest(), label_max=top,
                  grey_range=round((top - low) * scale), density=float(vessel.mean()))


def _probe_all(paths: list[Path], workers: int, max_file_mb: float = DEFAULT_MAX_FILE_MB,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> dict[Path, _Probe]:
    probe = functools.partial(_probe, max_file_mb=max_file_mb, max_megapixels=max_megapixels)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(probe, paths)))


def _to_8bit(src: Path, dst: Path, is_label: bool) -> None:
    """Write an 8-bit grayscale PNG copy of a 16/32-bit integer image (see module docstring)."""
    with Image.open(src) as im:
        arr = np.asarray(im).astype(np.int64)
    if is_label:
        out = np.where(arr > 0, 255, 0)
    else:
        out = arr if arr.max() <= 255 else np.rint(arr * (255.0 / 65535.0))
    with atomic_path(dst) as tmp:
        Image.fromarray(out.astype(np.uint8), mode="L").save(tmp, format="PNG")


# ---------------------------------------------------------------------------- checks over pairs

_Checked = tuple[_Pair, _Probe, "_Probe | None"]


def _sanity_problems(image: _Probe, label: _Probe | None, bounds: InputSanityConfig) -> list[str]:
    """Why a decodable pair is still unusable (tasks.config.InputSanityConfig says why each bound is safe)."""
    problems = []
    width, height = image.width, image.height
    if min(width, height) < bounds.min_image_side:
        problems.append(f"image is {width}x{height} px, smaller than {bounds.min_image_side} px on a side "
                        "(input_sanity.min_image_side)")
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > bounds.max_aspect_ratio:
        problems.append(f"image is {width}x{height} px, aspect ratio {ratio:.1f} over {bounds.max_aspect_ratio:g}: "
                        "preprocess would squash it into a square (input_sanity.max_aspect_ratio)")
    if image.grey_range < bounds.min_grey_range:
        problems.append(f"image is constant: its grey levels span {image.grey_range}, under "
                        f"{bounds.min_grey_range} (input_sanity.min_grey_range)")
    if label is not None and not bounds.min_label_density <= label.density <= bounds.max_label_density:
        what = ("empty or a few stray dots" if label.density < bounds.min_label_density
                else "all vessel, or inverted (vessels black)")
        problems.append(f"label vessel density {label.density:.3f} outside {bounds.min_label_density:g}.."
                        f"{bounds.max_label_density:g}: {what} (input_sanity.min/max_label_density)")
    return problems


def _check_pairs(pairs: list[_Pair], probes: dict[Path, _Probe], acc: _Acc,
                 bounds: InputSanityConfig = InputSanityConfig()) -> list[_Checked]:
    """Pairs whose files decode, agree in size, have a non-empty label and lie within ``bounds``;
    the rest go to quarantine with the reason."""
    good: list[_Checked] = []
    for pair in pairs:
        img_p = probes[pair.image]
        lab_p = probes[pair.label] if pair.label is not None else None
        pre = f"{pair.origin}: " if pair.origin else ""
        reasons: dict[Path, str] = {}
        if not img_p.ok:
            reasons[pair.image] = img_p.reason
        if lab_p is not None and not lab_p.ok:
            reasons[pair.label] = lab_p.reason
        if not reasons and lab_p is not None:
            if (img_p.width, img_p.height) != (lab_p.width, lab_p.height):
                size = f"image is {img_p.width}x{img_p.height} but its label is {lab_p.width}x{lab_p.height}"
                reasons = {pair.image: size, pair.label: size}
            elif lab_p.label_max < (1 if lab_p.mode in INT_MODES else 128):
                empty = (f"label has no pixel above 127 (max {lab_p.label_max}): empty after binarising; "
                         "save vessels as 255")
                reasons = {pair.image: empty, pair.label: empty}
        if not reasons:
            problems = "; ".join(_sanity_problems(img_p, lab_p, bounds))
            if problems:
                reasons = {pair.image: problems, **({pair.label: problems} if pair.label is not None else {})}
        if reasons:
            for path in (pair.image, pair.label):
                if path is None:
                    continue
                other = pair.label if path == pair.image else pair.image
                acc.reject(path, pre + reasons.get(path, f"its {'label' if other == pair.label else 'image'} "
                                                          f"was rejected ({other.name})"))
            continue
        good.append((pair, img_p, lab_p))
    return good


def _drop_duplicates(good: list[_Checked], acc: _Acc) -> tuple[list[_Checked], list[dict]]:
    """Keep the earliest stage of each exam; quarantine the rest as 'duplicate of <kept path>'."""
    order = sorted(good, key=lambda g: (g[0].stage, str(g[0].image)))
    seen: dict[tuple, _Pair] = {}
    kept, dups = [], []
    for pair, probe, lab_probe in order:
        keys = {("file", os.path.realpath(pair.image)): "the same file listed twice",
                ("exam", pair.patient_id, pair.exam_id): f"same exam {pair.patient_id}_{pair.exam_id}",
                ("bytes", pair.patient_id, probe.sha1): "identical image content"}
        if not pair.exam_is_id:
            keys.pop(("exam", pair.patient_id, pair.exam_id))
        hit = next(((k, why) for k, why in keys.items() if k in seen), None)
        if hit is None:
            for k in keys:
                seen[k] = pair
            kept.append((pair, probe, lab_probe))
            continue
        first, why = seen[hit[0]], hit[1]
        note = f"{why}; kept {STAGE_NAMES[first.stage]}, the earliest stage"
        if pair.origin:
            note = f"{pair.origin}: {note}"
        acc.reject(pair.image, f"duplicate of {first.image} ({note})")
        if pair.label is not None:
            acc.reject(pair.label, f"duplicate of {first.label or first.image} ({note})")
        dups.append({"kept": str(first.image), "dropped": str(pair.image), "kept_stage": STAGE_NAMES[first.stage],
                     "dropped_stage": STAGE_NAMES[pair.stage], "why": why})
    return kept, dups


def _convert(kept: list[_Checked], converted_dir: Path, root: Path | None) -> list[dict[str, str]]:
    """Note non-8-bit-grayscale files; give 16/32-bit ones an 8-bit PNG copy the manifest points at."""
    conversions: list[dict[str, str]] = []
    for pair, img_p, lab_p in kept:
        for path, probe, is_label in ((pair.image, img_p, False), (pair.label, lab_p, True)):
            if probe is None or probe.mode == "L":
                continue
            if probe.mode in INT_MODES:
                if root is not None and _inside(str(path), str(root)):
                    rel = path.relative_to(root).with_suffix(".png")
                else:  # manifest input: names may repeat across folders, so tag with the path's hash
                    tag = hashlib.sha1(str(path).encode()).hexdigest()[:10]
                    rel = Path(safe_component(pair.patient_id)) / f"{safe_component(path.stem)}-{tag}.png"
                dst = ensure_inside(converted_dir, converted_dir / rel)  # ids are not ours: never leave RUN_DIR
                _to_8bit(path, dst, is_label)
                action = ("label: nonzero -> 255" if is_label
                          else "scaled to 8-bit (x*255/65535; kept as is if max <= 255)")
                conversions.append({"path": str(path), "mode": probe.mode, "action": action,
                                    "converted_path": str(dst)})
                if is_label:
                    pair.label = dst
                else:
                    pair.image = dst
            else:
                conversions.append({"path": str(path), "mode": probe.mode,
                                    "action": "read as grayscale luminance (alpha dropped) by convert('L')"})
    return conversions


# ---------------------------------------------------------------------------- clinical sheet

def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def _read_clinical(folders: list[Path], patients: set[str], acc: _Acc) -> dict:
    """Status of Infomation.xlsx (sic): found, sheets, rows; ingest carries on without it."""
    path = None
    for folder in folders:
        for name, p, is_dir in _list(folder, None, acc.real_root or os.path.realpath(folder)):
            if not is_dir and name.lower() in CLINICAL_FILES:
                path = path or p
    if path is None:
        acc.warnings.append("clinical sheet Infomation.xlsx not found; continuing without clinical data")
        return {"status": "missing"}
    try:
        sheets = pd.read_excel(path, sheet_name=None, engine="openpyxl")
    except Exception as exc:  # a broken workbook must not stop ingest; it is reported
        acc.warnings.append(f"clinical sheet {path.name} is unreadable ({_short(exc)}); continuing without it")
        return {"status": "unreadable", "path": str(path), "error": _short(exc)}
    by_name = {_norm(k): k for k in sheets}
    status: dict = {"status": "ok", "path": str(path), "sheets": {}}
    for wanted in CLINICAL_SHEETS:
        actual = by_name.get(_norm(wanted))
        if actual is None:
            acc.warnings.append(f"clinical sheet {path.name} has no '{wanted}' sheet (has: {', '.join(sheets)})")
            status["sheets"][wanted] = {"status": "missing"}
            status["status"] = "partial"
            continue
        frame = sheets[actual]
        status["sheets"][wanted] = {"status": "ok", "rows": int(len(frame)),
                                    "columns": [str(c) for c in frame.columns]}
    basic = by_name.get(_norm("basic_info"))
    if basic is not None and patients:
        cols = {_norm(c): c for c in sheets[basic].columns}
        col = next((cols[c] for c in ("subid", "subjectid", "patientid", "pid", "id") if c in cols), None)
        if col is not None:
            ids = {str(int(v)) if isinstance(v, (int, float)) and float(v).is_integer() else str(v).strip()
                   for v in sheets[basic][col].dropna()}
            canon = {str(int(p)) if p.isdigit() else p for p in patients}
            no_sheet = sorted(canon - ids, key=_natural)
            status["patients_without_clinical_row"] = no_sheet
            status["clinical_rows_without_images"] = sorted(ids - canon, key=_natural)
            if no_sheet:
                acc.warnings.append(f"{len(no_sheet)} patient(s) have images but no basic_info row: "
                                    f"{', '.join(no_sheet[:10])}")
    return status


# ---------------------------------------------------------------------------- outputs

def _count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    pids = sorted(set(manifest["patient_id"]), key=_natural)
    table = pd.DataFrame(0, index=pids, columns=list(STAGE_NAMES), dtype=int)
    for (pid, name), n in manifest.groupby(["patient_id", "stage_name"]).size().items():
        table.loc[pid, name] = int(n)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "patient_id"
    table.columns.name = None
    return table


def _pretty(table: pd.DataFrame) -> str:
    shown = table.astype(str).where(table != 0, ".")
    patients = (table.drop(index="total") > 0).sum(axis=0)
    shown.loc["patients"] = patients.astype(str)
    shown.loc["patients", "total"] = str(len(table) - 1)
    return shown.to_string()


def ingest(source: Path, run_dir: Path, *, log: Callable[[str], None] = run_log,
           workers: int | None = None, max_file_mb: float = DEFAULT_MAX_FILE_MB,
           max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
           sanity: InputSanityConfig = InputSanityConfig()) -> IngestResult:
    """Read SOUL or a manifest CSV at ``source``; write manifest/quarantine/stage table/ingest.json in ``run_dir``.

    Files over ``max_file_mb`` or whose header declares more than ``max_megapixels`` are
    quarantined with the reason before they are read or decoded; pairs outside ``sanity``'s
    bounds (size, aspect ratio, grey range, label density) after decoding.
    """
    started = time.perf_counter()
    source = Path(source).expanduser().absolute()
    paths = RunPaths.of(Path(run_dir).expanduser().absolute())
    workers = workers or min(os.cpu_count() or 1, 8)
    acc = _Acc()
    clinical_folders: list[Path] = []
    root: Path | None = None
    if source.is_file():
        kind = "manifest"
        pairs = _scan_manifest(source, acc)
    else:
        kind = "soul"
        root = _soul_root(source)
        acc.real_root = os.path.realpath(root)
        pairs = _scan_soul(root, acc)
        clinical_folders = [root] + ([source] if root != source else [])
    log(f"ingest: {kind} input {source}: {len(pairs)} candidate pairs, decoding with {workers} threads")

    files = sorted({p for pair in pairs for p in (pair.image, pair.label) if p is not None})
    probes = _probe_all(files, workers, max_file_mb, max_megapixels)
    kept, duplicates = _drop_duplicates(_check_pairs(pairs, probes, acc, sanity), acc)
    conversions = _convert(kept, paths.root / "converted", root)

    rows = [{"patient_id": p.patient_id, "stage": p.stage, "stage_name": STAGE_NAMES[p.stage],
             "exam_id": p.exam_id, "subset": STAGE_NAMES[p.stage], "image_path": str(p.image),
             "label_path": str(p.label) if p.label is not None else "", "width": pr.width, "height": pr.height}
            for p, pr, _ in kept]
    rows.sort(key=lambda r: (_natural(r["patient_id"]), r["stage"], _natural(r["exam_id"])))
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    write_text_atomic(paths.manifest, manifest.to_csv(index=False))
    quarantine = pd.DataFrame(sorted(acc.quarantine), columns=list(QUARANTINE_COLUMNS))
    write_text_atomic(paths.quarantine, quarantine.to_csv(index=False))
    table = _count_table(manifest)
    write_text_atomic(paths.stage_table, table.to_csv())

    patients = set(manifest["patient_id"])
    clinical = _read_clinical(clinical_folders, patients, acc) if kind == "soul" else {"status": "not applicable"}
    per_stage = {name: {"patients": int((table.loc[table.index != "total", name] > 0).sum()),
                        "images": int(table.loc["total", name])} for name in STAGE_NAMES}
    json_path = paths.ingest_json
    result = IngestResult(
        source=str(source), source_kind=kind, n_images=len(manifest), n_patients=len(patients),
        n_quarantined=len(quarantine), n_skipped_hidden=acc.hidden,
        counts={str(k): {c: int(v) for c, v in row.items()} for k, row in table.to_dict("index").items()},
        per_stage=per_stage, duplicates=duplicates, conversions=conversions, warnings=acc.warnings,
        clinical=clinical,
        paths={"manifest": str(paths.manifest), "quarantine": str(paths.quarantine),
               "stage_table": str(paths.stage_table), "ingest_json": str(json_path)},
        elapsed_s=round(time.perf_counter() - started, 3))
    write_json_atomic(json_path, result.model_dump())

    log(f"ingest: {result.n_images} image/label pairs from {result.n_patients} patients; "
        + ", ".join(f"{s} {v['patients']}/{v['images']}" for s, v in per_stage.items()) + " (patients/images)")
    log("images per patient and stage ('.' = none):\n" + _pretty(table))
    if result.n_quarantined:
        shown = "; ".join(f"{Path(p).name}: {r}" for p, r in acc.quarantine[:5])
        log(f"ingest: quarantined {result.n_quarantined} file(s), see {paths.quarantine} (first: {shown})")
    if duplicates:
        log(f"ingest: {len(duplicates)} duplicate exam(s) dropped, earliest stage kept (listed in quarantine.csv)")
    if conversions:
        modes = pd.Series([c["mode"] for c in conversions]).value_counts().to_dict()
        log(f"ingest: {len(conversions)} file(s) not 8-bit grayscale, converted: {modes} (details in ingest.json)")
    if acc.hidden:
        log(f"ingest: skipped {acc.hidden} hidden/system file(s) (.DS_Store, Thumbs.db, ...)")
    for warning in acc.warnings:
        log(f"warning: {warning}")
    if result.n_images == 0:
        raise InputDataError(f"no usable image/label pairs in {source}; {result.n_quarantined} file(s) "
                             f"quarantined, reasons in {paths.quarantine}")
    return result


# ---------------------------------------------------------------------------- the step

def ingest_step(ctx: StepContext) -> IngestResult:
    """The 'ingest' step: the run's input source -> manifest, quarantine, stage table, ingest.json."""
    return ingest(ctx.source, ctx.run_dir, log=ctx.log, max_file_mb=ctx.config.max_file_mb,
                  max_megapixels=ctx.config.max_megapixels, sanity=ctx.config.input_sanity)


def preflight_ingest(ctx: StepContext) -> None:
    """The 'ingest' command's check before Prefect starts: the source is a SOUL root or a readable manifest."""
    check_source(ctx.source)


INGEST = Step(
    name="ingest", run=ingest_step, result_type=IngestResult, reads_source=True, retries=1,
    command=StepCommand("ingest", "read a SOUL directory or manifest CSV: manifest.csv, quarantine.csv, stage table",
                        preflight=preflight_ingest, config_options=False),
    config_fields=("max_file_mb", "max_megapixels", "input_sanity"),
    writes=("manifest", "quarantine", "stage_table", "ingest_json"),
    description="read a SOUL directory or manifest CSV: manifest.csv, quarantine.csv, stage table")
