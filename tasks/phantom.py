"""The built-in SOUL phantom: a procedural OCTA (superficial plexus) dataset in the exact SOUL layout.

Why: the demo and the tests need data shaped like SOUL (Xue et al. 2024) without
downloading it, and the downstream models need something to *learn*: each patient
has their own anatomy (vessel trees, foveal avascular zone, brightness, eye) and a
BRVO non-perfusion sector that reperfuses along a per-patient trajectory over the
six treatment stages, so a stage's look is predictable from the patient's others.

Layout written (nothing else goes into ``out_dir``)::

    S1/s1t1/image/<pid>/<pid>_<examid>.jpg    304x304 grayscale JPG
    S1/s1t1/label/<pid>/<pid>_<examid>.jpg    vessel mask, 0/255, JPEG-lossy (binarise at 127)
    ... S1/s1t2, S2/s2t1, S2/s2t2, S3/s3t1, S3/s3t2
    Infomation.xlsx                           sheets 'basic_info' and 'image_info' (sic)

One patient's anatomy is rendered once; each attended stage re-renders only what
the stage changes (the non-perfused area); each exam is a repeat scan of that
stage: a shift of at most ~3 px plus its own speckle and motion lines.
Everything is a function of ``(seed, patient_index)``, so the bytes do not depend
on the number of worker processes. Coordinates are millimetres on the 6x6 mm scan,
fovea near (0, 0), +x nasal, +y inferior (image rows); left eyes are mirrored.
"""
from __future__ import annotations

import datetime as _dt
import io
import math
import re
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from pydantic import BaseModel
from scipy import ndimage

from storage.atomic import output_mode
from storage.errors import BrvoError
from storage.paired_format import STAGE_NAMES
from tasks.workers import reset_signals, worker_context

#: SOUL Table 3: patients and images per subset (of 53 patients).
PAPER_PATIENTS = (48, 36, 37, 26, 20, 11)
PAPER_IMAGES = (209, 219, 187, 189, 120, 99)
PAPER_N = 53
MAX_EXAMS = 8
SCAN_MM = 6.0
SHEET_NAME = "Infomation.xlsx"
#: Quadrant of the occluded branch: name, direction (temporal = -x, superior = -y), probability.
QUADRANTS = (("superotemporal", (-1, -1), 0.6), ("inferotemporal", (-1, 1), 0.3),
             ("superonasal", (1, -1), 0.05), ("inferonasal", (1, 1), 0.05))
_SUPERSAMPLE = 3  # vessels are drawn at 3x and averaged down: anti-aliased edges
_PLAN_TAG = 0x50_1A  # separates the attendance stream from the per-patient streams


def stage_dir(stage: int) -> str:
    """'S2/s2t1' for stage 2: the SOUL subset folder of a stage index 0..5."""
    return f"S{stage // 2 + 1}/{STAGE_NAMES[stage]}"


# ----------------------------------------------------------------------------- plan (pure, no images)

def stage_patient_counts(n_patients: int) -> tuple[int, ...]:
    """Patients per stage, SOUL's 48/36/37/26/20/11 of 53 scaled to ``n_patients`` (>= 1 each when N >= 3)."""
    floor = 1 if n_patients >= 3 else 0
    return tuple(int(min(n_patients, max(floor, round(c * n_patients / PAPER_N)))) for c in PAPER_PATIENTS)


def plan_attendance(n_patients: int, seed: int) -> np.ndarray:
    """Bool (n_patients, 6): who attends which stage.

    Each patient has a latent 'retention'; a stage takes its quota of patients with the
    highest retention plus stage-specific jitter, so later stages are mostly, not
    strictly, nested (SOUL's s2t1 has more patients than s1t2). Then every patient
    gets at least one stage and the most retained patient gets all six, by swaps that
    keep the per-stage counts.
    """
    counts = stage_patient_counts(n_patients)
    rng = np.random.default_rng([seed, _PLAN_TAG, n_patients])
    retention = rng.random(n_patients)
    score = retention[:, None] + 0.25 * rng.random((n_patients, 6))
    att = np.zeros((n_patients, 6), dtype=bool)
    for s, c in enumerate(counts):
        att[np.argsort(-score[:, s], kind="stable")[:c], s] = True

    best = int(np.argmax(retention))

    def swap_in(p: int, s: int) -> None:
        """Give p stage s, taking it from the least retained attendee who keeps another stage."""
        donors = [q for q in np.argsort(score[:, s], kind="stable")
                  if att[q, s] and q != p and att[q].sum() > 1 and q != best]
        if donors:
            att[donors[0], s] = False
        att[p, s] = True

    if min(counts) >= 1:
        for s in range(6):
            if not att[best, s]:
                swap_in(best, s)
    for p in range(n_patients):
        if not att[p].any():
            swap_in(p, int(np.argmax(score[p])))
    return att


def plan_exam_counts(attendance: np.ndarray, seed: int) -> np.ndarray:
    """Int (n_patients, 6): repeat scans per attended visit, 1..8, with SOUL's per-stage means."""
    n = attendance.shape[0]
    rng = np.random.default_rng([seed, _PLAN_TAG, n, 1])
    mean = np.minimum(np.array(PAPER_IMAGES) / np.array(PAPER_PATIENTS), MAX_EXAMS - 0.5)
    p = (mean - 1) / (MAX_EXAMS - 1)
    counts = 1 + rng.binomial(MAX_EXAMS - 1, np.broadcast_to(p, (n, 6)))
    return np.where(attendance, counts, 0)


# ----------------------------------------------------------------------------- anatomy

@dataclass
class PatientParams:
    """The per-patient ground truth a test or a figure may want (not written to disk)."""
    eye: str
    quadrant: str
    sector_angle: float      # radians, image coordinates (x nasal, y down) before mirroring
    extent0: float           # non-perfusion extent at stage 0, in (0, 1)
    rate: float              # reperfusion rate: extent(s) = extent0 * exp(-rate * s)
    max_area: float          # image fraction non-perfused at extent 1; extent e gives max_area * e**1.5
    faz_mm: float
    gain: float

    def extent(self, stage: int) -> float:
        return self.extent0 * math.exp(-self.rate * stage)

    def area(self, stage: int) -> float:
        """Fraction of the image that is non-perfused at ``stage``."""
        return self.max_area * self.extent(stage) ** 1.5


def sample_params(rng: np.random.Generator) -> PatientParams:
    names = [q[0] for q in QUADRANTS]
    qi = int(rng.choice(len(QUADRANTS), p=[q[2] for q in QUADRANTS]))
    dx, dy = QUADRANTS[qi][1]
    angle = math.atan2(dy, dx) + rng.uniform(-0.3, 0.3)
    responder = rng.random() < 0.8
    return PatientParams(
        eye="OD" if rng.random() < 0.5 else "OS",
        quadrant=names[qi],
        sector_angle=angle,
        extent0=float(rng.uniform(0.6, 0.95)),
        rate=float(rng.uniform(0.18, 0.45) if responder else rng.uniform(0.0, 0.06)),
        faz_mm=float(rng.uniform(0.22, 0.42)),
        gain=float(rng.uniform(0.8, 1.12)),
        max_area=float(rng.uniform(0.12, 0.26)),
    )


class _Tree:
    """Grows vessel trees as random walks that taper, branch and stop at the FAZ."""

    def __init__(self, rng: np.random.Generator, faz_mm: float, fovea: tuple[float, float], px_per_mm: float):
        self.rng = rng
        self.faz = faz_mm
        self.fx, self.fy = fovea
        self.px = px_per_mm
        self.segs: list[tuple[float, float, float, float, float]] = []  # x0, y0, x1, y1 (mm), width (px)
        self.step = 0.05
        self.w_min = 0.9
        # coarse occupancy grid (0.1 mm cells): a small vessel that runs into another one ends
        # there (joins it), so trees fill space instead of piling up into tangles
        self.cell = 0.1
        self.owner = np.full((80, 80), -1, dtype=np.int64)
        self.next_id = 0

    def _cell(self, x: float, y: float) -> tuple[int, int]:
        return int((y + 4.0) / self.cell), int((x + 4.0) / self.cell)

    def _inside(self, x: float, y: float) -> bool:
        return abs(x) < 3.3 and abs(y) < 3.3

    def add_path(self, pts: np.ndarray, widths: np.ndarray) -> None:
        """A main vessel (arcade): not in the occupancy grid, small vessels may cross it."""
        for (x0, y0), (x1, y1), w in zip(pts[:-1], pts[1:], widths[:-1]):
            self.segs.append((x0, y0, x1, y1, float(w)))

    def grow(self, x: float, y: float, heading: float, width: float, pull: float, depth: int = 0,
             tree: int = -1) -> None:
        """Smooth random walk from (x, y) that tapers and branches; ``pull`` (0..1) bends it towards the fovea."""
        rng = self.rng
        turn = 0.0
        since_branch = 0.0
        next_branch = rng.uniform(0.3, 0.7)
        side = 1 if rng.random() < 0.5 else -1
        if tree < 0:
            tree, self.next_id = self.next_id, self.next_id + 1
        for step in range(400):
            r = math.hypot(x - self.fx, y - self.fy)
            if width < self.w_min or not self._inside(x, y) or r < self.faz * rng.uniform(1.3, 1.8):
                return
            cell = self._cell(x, y)
            if step > 3 and self.owner[cell] not in (-1, tree):
                return  # ran into another tree's vessel: joined it
            self.owner[cell] = tree
            to_fovea = math.atan2(self.fy - y, self.fx - x)
            diff = (to_fovea - heading + math.pi) % (2 * math.pi) - math.pi
            turn = 0.8 * turn + rng.normal(0.0, 0.02)
            heading += turn + pull * 0.15 * diff
            nx, ny = x + self.step * math.cos(heading), y + self.step * math.sin(heading)
            self.segs.append((x, y, nx, ny, width))
            x, y = nx, ny
            width *= 0.992
            since_branch += self.step
            if since_branch > next_branch and width > 1.5 * self.w_min and depth < 5:
                since_branch, next_branch = 0.0, rng.uniform(0.3, 0.8)
                child_w = width * rng.uniform(0.5, 0.8)
                self.grow(x, y, heading + side * rng.uniform(0.4, 1.0), child_w,
                          pull=float(np.clip(pull + rng.uniform(-0.3, 0.3), 0.0, 1.0)), depth=depth + 1,
                          tree=tree)
                side = -side
                width *= 0.92


def _arcade(rng: np.random.Generator, sign: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    """One temporal arcade vessel: a wavy elliptical arc from the (off-image) disc around the fovea."""
    xd, xc = rng.uniform(4.0, 4.8), rng.uniform(-2.6, -1.2)  # disc, and where the arc is highest
    rx, ry = xd - xc, rng.uniform(2.0, 2.7)
    theta = np.linspace(0.15, math.acos(max(-1.0, (-3.4 - xc) / rx)), 400)
    x = xc + rx * np.cos(theta)
    y = sign * ry * np.sin(theta) * (1 + 0.12 * (xc - x).clip(0) / 3)
    ph = rng.uniform(0, 2 * math.pi, 3)
    wig = 0.06 * np.sin(5 * theta + ph[0]) + 0.04 * np.sin(11 * theta + ph[1]) + 0.02 * np.sin(23 * theta + ph[2])
    y = y + sign * wig
    w0 = rng.uniform(0.10, 0.14) * px
    widths = w0 * np.linspace(1.0, 0.55, len(x))
    return np.stack([x, y], 1), widths


def build_vessels(rng: np.random.Generator, params: PatientParams, fovea: tuple[float, float],
                  px: float) -> np.ndarray:
    """All vessel segments of one patient: (n, 5) array x0, y0, x1, y1 (mm), width (px at output size)."""
    tree = _Tree(rng, params.faz_mm, fovea, px)
    for sign in (-1, 1):
        for k in range(2):  # artery + vein per arcade
            pts, widths = _arcade(rng, sign, px)
            if k:
                widths = widths * 0.8
            tree.add_path(pts, widths)
            idx = int(rng.integers(15, 40))
            while idx < len(pts) - 5:
                (x0, y0), (x1, y1) = pts[idx], pts[idx + 1]
                heading = math.atan2(y1 - y0, x1 - x0)
                inward = rng.random() < 0.65
                # the arcade runs nasal -> temporal (heading ~ pi); turning by +sign points at the fovea
                h = heading + (sign if inward else -sign) * rng.uniform(0.6, 1.3)
                tree.grow(float(x0), float(y0), h, widths[idx] * rng.uniform(0.45, 0.7),
                          pull=rng.uniform(0.4, 0.9) if inward else rng.uniform(0.0, 0.2))
                idx += int(rng.integers(22, 45))
    for _ in range(int(rng.integers(6, 10))):  # papillomacular branches from the nasal edge
        y0 = rng.uniform(-1.4, 1.4) + fovea[1]
        tree.grow(3.3, y0, math.pi + rng.normal(0, 0.25), rng.uniform(0.05, 0.08) * px, pull=rng.uniform(0.3, 0.7))
    for _ in range(int(rng.integers(4, 8))):  # temporal branches reaching over the raphe region
        sign = 1 if rng.random() < 0.5 else -1
        tree.grow(-3.3, sign * rng.uniform(0.6, 2.0) + fovea[1], rng.normal(0, 0.3) - sign * 0.3,
                  rng.uniform(0.04, 0.06) * px, pull=rng.uniform(0.2, 0.5))
    return np.asarray(tree.segs, dtype=np.float64)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation.

    Wide filters run on a coarse grid and are interpolated up: the result is just as
    smooth and an order of magnitude cheaper than a 4-sigma kernel at full size.
    """
    f = max(1, int(sigma // 3))
    coarse = (shape[0] // f + 3, shape[1] // f + 3)
    n = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / f, mode="wrap")
    if f > 1:
        n = ndimage.zoom(n, f, order=1)[f:f + shape[0], f:f + shape[1]]
    else:
        n = n[:shape[0], :shape[1]]
    return n / (n.std() + 1e-12)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@dataclass
class Anatomy:
    """One patient's rendered anatomy on a canvas ``pad`` px larger than the image on each side."""
    params: PatientParams
    size: int
    pad: int
    segs_px: np.ndarray       # (n, 5): x0, y0, x1, y1, width, in canvas px
    seg_np: np.ndarray        # (n,) non-perfusion field at each segment's midpoint
    seg_droppable: np.ndarray # (n,) bool: small enough to lose perfusion
    mesh: np.ndarray          # capillary mesh intensity, 0..1
    faz: np.ndarray           # 0 inside the FAZ, 1 outside
    np_field: np.ndarray      # non-perfusion field: highest at the occluded sector's core
    shade: np.ndarray         # multiplicative illumination field (per patient)
    background: float
    fovea_px: tuple[float, float]  # (x, y) of the fovea in output-image px, before mirroring


def build_anatomy(seed: int, patient_index: int, size: int = 304) -> Anatomy:
    """Everything about a patient that does not change between stages and exams."""
    rng = np.random.default_rng([seed, patient_index])
    params = sample_params(rng)
    px = size / SCAN_MM
    pad = max(2, math.ceil(4 * size / 304))
    canvas = size + 2 * pad
    fovea = tuple(float(v) for v in np.clip(rng.normal(0, 0.12, 2), -0.25, 0.25))
    segs = build_vessels(rng, params, fovea, px)

    # canvas pixel grid in mm
    c = (np.arange(canvas) - pad + 0.5) / px - SCAN_MM / 2
    X, Y = np.meshgrid(c, c)
    dx, dy = X - fovea[0], Y - fovea[1]
    r, th = np.hypot(dx, dy), np.arctan2(dy, dx)

    # FAZ: irregular circle with a soft rim where the capillaries thin out
    a = rng.uniform(0, 2 * np.pi, 3)
    faz_r = params.faz_mm * (1 + 0.10 * np.cos(2 * th + a[0]) + 0.06 * np.cos(3 * th + a[1])
                             + 0.04 * np.cos(5 * th + a[2]))
    faz = _smoothstep((r - faz_r) / 0.12)

    # capillary mesh: zero-crossings of band-limited noise form a closed-cell network
    s = size / 304
    ridge1 = np.exp(-(_smooth_noise(rng, (canvas, canvas), 1.4 * s) / 0.35) ** 2)
    ridge2 = np.exp(-(_smooth_noise(rng, (canvas, canvas), 2.5 * s) / 0.30) ** 2)
    density = 1 + 0.12 * _smooth_noise(rng, (canvas, canvas), 25 * s)
    mesh = ndimage.gaussian_filter(0.35 + 0.4 * ridge1 + 0.3 * ridge2, 0.5 * s) * density

    # non-perfusion field: a blob in the occluded sector, bounded by the horizontal raphe
    dth = (th - params.sector_angle + np.pi) % (2 * np.pi) - np.pi
    sig_t, r0, sig_r = rng.uniform(0.35, 0.6), rng.uniform(0.8, 1.5), rng.uniform(0.7, 1.1)
    field = np.exp(-0.5 * (dth / sig_t) ** 2 - 0.5 * (np.maximum(r - r0, (r0 - r) * 0.5) / sig_r) ** 2)
    field *= np.exp(0.4 * _smooth_noise(rng, (canvas, canvas), 12 * s)
                    + 0.2 * _smooth_noise(rng, (canvas, canvas), 5 * s))  # irregular border
    hemi = -1.0 if math.sin(params.sector_angle) < 0 else 1.0  # superior sectors stay above the raphe
    field = field / (1 + np.exp(-hemi * dy / 0.08))

    shade = np.exp(0.12 * _smooth_noise(rng, (canvas, canvas), 60 * s))
    shade *= 1 - 0.25 * _smoothstep((np.maximum(np.abs(X), np.abs(Y)) - 2.3) / 0.8)  # darker margins
    background = float(rng.uniform(15, 30))

    # segments to canvas px; non-perfusion value at their midpoints
    to_px = lambda v: (v + SCAN_MM / 2) * px + pad  # noqa: E731
    segs_px = segs.copy()
    segs_px[:, :4] = to_px(segs[:, :4])
    mid_x = np.clip(((segs_px[:, 0] + segs_px[:, 2]) / 2).astype(int), 0, canvas - 1)
    mid_y = np.clip(((segs_px[:, 1] + segs_px[:, 3]) / 2).astype(int), 0, canvas - 1)
    seg_np = field[mid_y, mid_x]
    droppable = segs[:, 4] < 0.065 * px
    fovea_px = ((fovea[0] + SCAN_MM / 2) * px, (fovea[1] + SCAN_MM / 2) * px)
    return Anatomy(params, size, pad, segs_px, seg_np, droppable, mesh, faz, field, shade, background, fovea_px)


def _draw_vessels(segs_px: np.ndarray, canvas: int) -> np.ndarray:
    """Anti-aliased coverage (0..1) of the segments: drawn at supersampling, then box-averaged."""
    k = _SUPERSAMPLE
    img = Image.new("L", (canvas * k, canvas * k), 0)
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1, w in segs_px:
        wk = max(1.0, w * k)
        # PIL puts pixel centres on integers; ours sit at +0.5 (so do the other fields')
        u0, v0, u1, v1 = x0 * k - 0.5, y0 * k - 0.5, x1 * k - 0.5, y1 * k - 0.5
        draw.line((u0, v0, u1, v1), fill=255, width=int(round(wk)))
        rr = wk / 2
        if rr >= 3:  # round joints where a bend would otherwise notch a wide vessel
            draw.ellipse((u1 - rr, v1 - rr, u1 + rr, v1 + rr), fill=255)
    a = np.asarray(img, dtype=np.float32).reshape(canvas, k, canvas, k).mean(axis=(1, 3))
    return a / 255.0


def render_stage(anat: Anatomy, stage: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float 0..255, label bool) of one stage on the padded canvas, before per-exam effects."""
    canvas = anat.size + 2 * anat.pad
    # the region is the top `area` of the field: nested, so it only shrinks as the extent does
    inner = anat.np_field[anat.pad:-anat.pad, anat.pad:-anat.pad]
    t = max(float(np.quantile(inner, 1.0 - anat.params.area(stage))), 1e-12)
    keep = ~(anat.seg_droppable & (anat.seg_np > t))
    cover = _draw_vessels(anat.segs_px[keep], canvas)
    label = cover >= 0.35  # keeps 1-px vessels continuous where they fall between pixel centres
    perfused = 1 - 0.8 * _smoothstep((anat.np_field / t - 1) / 0.25 + 0.5)
    caps = 100 * anat.mesh * anat.faz * perfused
    vessels = 205 * ndimage.gaussian_filter(cover, 0.6 * anat.size / 304) ** 0.9
    img = anat.background + np.maximum(caps, vessels)
    img = img * anat.shade * anat.params.gain
    if anat.params.eye == "OS":  # left eye: the optic disc (and the nasal side) is on the left
        img, label = img[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(label)


def acquire_exam(stage_img: np.ndarray, stage_label: np.ndarray, size: int, pad: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One repeat scan of a stage -> (uint8 image, uint8 0/255 label).

    A shift of at most ~3 px (at 304) applied to both, then, on the image only, speckle,
    a small gain change and 0-3 full-width motion lines.
    """
    max_shift = max(1, round(3 * size / 304))
    oy, ox = pad + rng.integers(-max_shift, max_shift + 1, 2)
    img = stage_img[oy:oy + size, ox:ox + size].copy()
    label = stage_label[oy:oy + size, ox:ox + size]
    speckle = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.6 * size / 304)
    img = img * (1 + 0.4 * speckle) + rng.normal(0, 5, (size, size))
    img *= rng.uniform(0.96, 1.04)
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):  # horizontal motion artefacts, full width
        row = int(rng.integers(0, size))
        h = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            img[row:row + h] = img[row:row + h] * 0.3 + rng.uniform(120, 200)  # bright decorrelation line
        else:
            img[row:row + h] *= rng.uniform(0.1, 0.4)  # dark line (blink, signal loss)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), (label.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class _PatientJob:
    seed: int
    index: int
    size: int
    root: str
    exam_ids: tuple[tuple[str, ...], ...]  # per stage, () where the patient did not attend


def _save_jpg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path, format="JPEG", quality=95)


def _write_patient(job: _PatientJob) -> dict:
    """Render and write one patient's images and labels; return what the clinical sheet needs."""
    anat = build_anatomy(job.seed, job.index, job.size)
    pid = str(job.index + 1)
    root = Path(job.root)
    for stage, exam_ids in enumerate(job.exam_ids):
        if not exam_ids:
            continue
        stage_img, stage_label = render_stage(anat, stage)
        img_dir = root / stage_dir(stage) / "image" / pid
        lbl_dir = root / stage_dir(stage) / "label" / pid
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for k, exam_id in enumerate(exam_ids):
            rng = np.random.default_rng([job.seed, job.index, stage, k])
            image, label = acquire_exam(stage_img, stage_label, job.size, anat.pad, rng)
            name = f"{pid}_{exam_id}.jpg"
            _save_jpg(image, img_dir / name)
            _save_jpg(label, lbl_dir / name)
    p = anat.params
    return {"eye": p.eye, "quadrant": p.quadrant, "extent": [p.extent(s) for s in range(6)]}


def _clinical_sheets(seed: int, exam_ids: list[list[tuple[str, ...]]], info: list[dict]) -> dict[str, pd.DataFrame]:
    """Plausible 'basic_info' and 'image_info' sheets: dates, CMT and BCVA that follow the non-perfusion extent."""
    basic, images = [], []
    for idx, (stages, pinfo) in enumerate(zip(exam_ids, info)):
        rng = np.random.default_rng([seed, idx, 7])
        attended = [s for s in range(6) if stages[s]]
        n_surgeries = max(attended) // 2 + 1
        first = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3 * 365)))
        surgeries = [first]
        for _ in range(2):
            surgeries.append(surgeries[-1] + _dt.timedelta(days=int(rng.integers(30, 80))))
        cmt0, bcva0 = float(rng.uniform(330, 650)), float(rng.uniform(0.3, 1.0))
        basic.append({
            "SubID": idx + 1, "Gender": "M" if rng.random() < 0.55 else "F", "Age": int(rng.integers(42, 82)),
            "Eye": pinfo["eye"], "OcclusionSite": pinfo["quadrant"],
            **{f"Surgery{k + 1}Date": (surgeries[k] if k < n_surgeries else None) for k in range(3)},
            "FollowUps": len(attended), "CMT_baseline_um": round(cmt0), "BCVA_baseline_logMAR": round(bcva0, 2),
        })
        for s in attended:
            days = rng.integers(7, 13) if s % 2 == 0 else rng.integers(14, 28)  # t1 >= 7 d, t2 >= 14 d after
            visit = surgeries[s // 2] + _dt.timedelta(days=int(days))
            relief = pinfo["extent"][s] / max(pinfo["extent"][0], 1e-6)
            cmt = 250 + (cmt0 - 250) * (0.3 + 0.7 * relief) + rng.normal(0, 10)
            bcva = max(0.0, bcva0 * (0.4 + 0.6 * relief) + rng.normal(0, 0.03))
            for exam_id in stages[s]:
                images.append({
                    "SubID": idx + 1, "Subset": STAGE_NAMES[s], "ImageName": f"{idx + 1}_{exam_id}.jpg",
                    "ExamID": int(exam_id), "ExamDate": visit, "Eye": pinfo["eye"],
                    "CMT_um": round(cmt), "BCVA_logMAR": round(bcva, 2),
                })
    return {"basic_info": pd.DataFrame(basic), "image_info": pd.DataFrame(images)}


def _write_xlsx_deterministic(sheets: dict[str, pd.DataFrame], path: Path) -> None:
    """Write an xlsx whose bytes depend only on the data (openpyxl stamps 'now' into docProps and the zip)."""
    buf = io.BytesIO()
    with pd.ExcelWriter(buf, engine="openpyxl") as writer:
        for name, df in sheets.items():
            df.to_excel(writer, sheet_name=name, index=False)
    fixed = b"2024-01-01T00:00:00Z"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>" + fixed, data)
            info = zipfile.ZipInfo(item.filename, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)


class PhantomSummary(BaseModel):
    """What ``generate_phantom`` wrote: counts per stage, in SOUL's Table 3 terms."""
    out_dir: Path
    n_patients: int
    seed: int
    image_size: int
    n_images: int
    patients_per_stage: dict[str, int]
    images_per_stage: dict[str, int]
    full_timeline_patients: list[str]
    seconds: float


_SOUL_ENTRIES = {"S1", "S2", "S3", SHEET_NAME}


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work if ``out_dir`` may not be (re)placed: only an empty dir or, with overwrite, a phantom."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BrvoError(f"{out_dir} exists and is not a directory: choose another OUT_DIR")
    entries = {p.name for p in out_dir.iterdir()}
    if entries and not overwrite:
        raise BrvoError(f"{out_dir} is not empty: choose a new OUT_DIR or pass overwrite to replace a phantom")
    if not entries <= _SOUL_ENTRIES:
        extra = sorted(entries - _SOUL_ENTRIES)[:3]
        raise BrvoError(f"{out_dir} holds more than a SOUL tree ({', '.join(extra)}): refusing to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished tree onto ``out_dir``; an old phantom there is removed only after that."""
    tmp.chmod(output_mode(directory=True))  # mkdtemp makes it 0700; give it what mkdir would under the umask
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f"{tmp.name}.old")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old)


def generate_phantom(out_dir: Path, n_patients: int = 53, seed: int = 0, image_size: int = 304,
                     workers: int = 2, overwrite: bool = False,
                     log: Callable[[str], None] | None = None) -> PhantomSummary:
    """Write a SOUL-layout phantom of ``n_patients`` into ``out_dir`` and return its counts.

    The tree is built in a temporary sibling directory and renamed into place, so a
    killed run never leaves a half phantom at ``out_dir``. ``overwrite`` replaces an
    existing phantom (a directory holding only S1-S3 and the sheet).
    """
    log = log or (lambda _msg: None)
    if n_patients < 1:
        raise BrvoError(f"--patients must be at least 1 (got {n_patients})")
    if image_size < 32:
        raise BrvoError(f"image size must be at least 32 px (got {image_size}); SOUL's is 304")
    if seed < 0:
        raise BrvoError(f"seed must be a non-negative integer (got {seed})")
    if workers < 1:
        raise BrvoError(f"workers must be at least 1 (got {workers})")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    attendance = plan_attendance(n_patients, seed)
    n_exams = plan_exam_counts(attendance, seed)
    next_id = 10001
    exam_ids: list[list[tuple[str, ...]]] = [[() for _ in range(6)] for _ in range(n_patients)]
    for s in range(6):  # exam ids grow with time: stage-major, then patient
        for p in range(n_patients):
            exam_ids[p][s] = tuple(str(next_id + k) for k in range(n_exams[p, s]))
            next_id += n_exams[p, s]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        jobs = [_PatientJob(seed, p, image_size, str(tmp), tuple(exam_ids[p])) for p in range(n_patients)]
        log(f"phantom: rendering {n_patients} patients, {int(n_exams.sum())} exams, on {workers} process(es)")
        if workers == 1 or n_patients == 1:
            info = [_write_patient(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=min(workers, n_patients), mp_context=worker_context(),
                                     initializer=reset_signals) as pool:
                info = list(pool.map(_write_patient, jobs))
        _write_xlsx_deterministic(_clinical_sheets(seed, exam_ids, info), tmp / SHEET_NAME)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = PhantomSummary(
        out_dir=out_dir, n_patients=n_patients, seed=seed, image_size=image_size, n_images=int(n_exams.sum()),
        patients_per_stage={STAGE_NAMES[s]: int(attendance[:, s].sum()) for s in range(6)},
        images_per_stage={STAGE_NAMES[s]: int(n_exams[:, s].sum()) for s in range(6)},
        full_timeline_patients=[str(p + 1) for p in range(n_patients) if attendance[p].all()],
        seconds=round(time.perf_counter() - start, 2),
    )
    log(f"phantom: wrote {summary.n_images} images in {summary.seconds:.1f} s to {out_dir}; "
        f"patients per stage {summary.patients_per_stage}")
    return summary


# ----------------------------------------------------------------------------- figure and task

def render_timeline_figure(phantom_dir: Path, patient_id: str, out_png: Path, title: str | None = None) -> Path:
    """Draw one patient's six-stage timeline from a SOUL-layout tree: images on top, labels below.

    Shows the first exam of each stage (and how many there are); a stage without a
    visit is a hatched empty panel. Uses the Agg canvas directly, so it sets no global
    matplotlib backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    phantom_dir, out_png = Path(phantom_dir), Path(out_png)
    pid = str(patient_id)
    fig = Figure(figsize=(13.2, 4.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 6, gridspec_kw={"wspace": 0.04, "hspace": 0.1})
    found = 0
    for s in range(6):
        files = sorted((phantom_dir / stage_dir(s) / "image" / pid).glob("*.jpg"))
        top, bottom = axes[0, s], axes[1, s]
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        top.set_title(f"{STAGE_NAMES[s]}  (stage {s}, {len(files)} exam{'s' if len(files) != 1 else ''})", fontsize=9)
        if not files:
            for ax in (top, bottom):
                ax.set_facecolor("0.85")
                ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="//", edgecolor="0.6"))
                ax.text(0.5, 0.5, "no visit", ha="center", va="center", transform=ax.transAxes, color="0.3")
            continue
        found += 1
        label_path = phantom_dir / stage_dir(s) / "label" / pid / files[0].name
        top.imshow(np.asarray(Image.open(files[0]).convert("L")), cmap="gray", vmin=0, vmax=255)
        bottom.imshow(np.asarray(Image.open(label_path).convert("L")) >= 127, cmap="gray", vmin=0, vmax=1)
        top.set_xlabel(files[0].name, fontsize=7)
    if not found:
        raise BrvoError(f"patient {pid} has no images under {phantom_dir}: pick a patient folder that exists")
    axes[0, 0].set_ylabel("image", fontsize=10)
    axes[1, 0].set_ylabel("vessel label", fontsize=10)
    fig.suptitle(title or f"Patient {pid} of {phantom_dir.name}: first exam of each treatment stage, "
                          "image and vessel label", fontsize=11)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png


def _phantom_step(out_dir: Path, n_patients: int = 53, seed: int = 0, image_size: int = 304,
                  workers: int = 2, overwrite: bool = False) -> PhantomSummary:
    from tasks.reporting import run_log

    return generate_phantom(out_dir, n_patients=n_patients, seed=seed, image_size=image_size,
                            workers=workers, overwrite=overwrite, log=run_log)


def _make_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    # writing a directory is a side effect: never skip it because the inputs look the same
    return task(name="phantom", cache_policy=NO_CACHE)(_phantom_step)


phantom_task = _make_task()
