"""One patient's anatomy and how it looks at each treatment stage.

Why: the downstream models need something to *learn*. Each patient has their own
anatomy (vessel trees, foveal avascular zone, capillary mesh, brightness, eye) and a
BRVO non-perfusion sector that reperfuses along a per-patient trajectory over the six
stages, so a stage's look is predictable from the patient's other stages. The anatomy
is rendered once; a stage re-renders only what the stage changes (the non-perfused
area). Everything is a function of ``(seed, patient_index)`` and the config's knobs.
Coordinates are millimetres on the 6x6 mm scan, fovea near (0, 0), +x nasal,
+y inferior (image rows); left eyes are mirrored.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from brvo_models.phantom.config import PhantomConfig
from brvo_models.phantom.vessels import build_vessels

SCAN_MM = 6.0
#: Quadrant of the occluded branch: name, direction (temporal = -x, superior = -y), probability.
QUADRANTS = (("superotemporal", (-1, -1), 0.6), ("inferotemporal", (-1, 1), 0.3),
             ("superonasal", (1, -1), 0.05), ("inferonasal", (1, 1), 0.05))
#: Grey levels at contrast 1: the capillary mesh peaks at CAPILLARY_PEAK, a vessel's core at VESSEL_PEAK.
CAPILLARY_PEAK = 100.0
VESSEL_PEAK = 205.0
_SUPERSAMPLE = 3  # vessels are drawn at 3x and averaged down: anti-aliased edges


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


def sample_params(rng: np.random.Generator, non_perfusion_size: float = 1.0) -> PatientParams:
    """A patient's eye, occluded quadrant, reperfusion course, FAZ and brightness.

    ``non_perfusion_size`` multiplies the non-perfused area (the config knob); the draws do not depend on it.
    """
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
        max_area=float(rng.uniform(0.12, 0.26)) * non_perfusion_size,
    )


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
    vessel_peak: float        # grey level of a vessel's core before shading (the contrast knob)


def _patient_vessels(rng: np.random.Generator, faz_mm: float, fovea: tuple[float, float], px: float,
                     density: float) -> np.ndarray:
    """The patient's vessel segments at ``density``, leaving ``rng`` where the demo's trees leave it.

    Why: a denser tree takes more random draws; without this, changing the density would
    also re-draw the patient's FAZ, capillary mesh and non-perfusion sector, and the knob
    would not be a controlled change. The trees at ``density`` grow from the same stream
    as the demo's (so the arcades match); the demo's trees are grown and discarded only
    to advance ``rng``.
    """
    if density == 1.0:
        return build_vessels(rng, faz_mm, fovea, px)
    own = copy.deepcopy(rng)
    build_vessels(rng, faz_mm, fovea, px)
    return build_vessels(own, faz_mm, fovea, px, density)


def build_anatomy(config: PhantomConfig, patient_index: int) -> Anatomy:
    """Everything about a patient that does not change between stages and exams."""
    size = config.image_size
    rng = np.random.default_rng([config.seed, patient_index])
    params = sample_params(rng, config.non_perfusion_size)
    px = size / SCAN_MM
    pad = max(2, math.ceil(4 * size / 304))
    canvas = size + 2 * pad
    fovea = tuple(float(v) for v in np.clip(rng.normal(0, 0.12, 2), -0.25, 0.25))
    segs = _patient_vessels(rng, params.faz_mm, fovea, px, config.vessel_density)

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

    # segments to canvas px (widths times the width knob); non-perfusion value at their midpoints
    to_px = lambda v: (v + SCAN_MM / 2) * px + pad  # noqa: E731
    segs_px = segs.copy()
    segs_px[:, :4] = to_px(segs[:, :4])
    segs_px[:, 4] = segs[:, 4] * config.vessel_width
    mid_x = np.clip(((segs_px[:, 0] + segs_px[:, 2]) / 2).astype(int), 0, canvas - 1)
    mid_y = np.clip(((segs_px[:, 1] + segs_px[:, 3]) / 2).astype(int), 0, canvas - 1)
    seg_np = field[mid_y, mid_x]
    droppable = segs[:, 4] < 0.065 * px  # which vessels a BRVO can close does not depend on the drawn width
    fovea_px = ((fovea[0] + SCAN_MM / 2) * px, (fovea[1] + SCAN_MM / 2) * px)
    vessel_peak = CAPILLARY_PEAK + config.contrast * (VESSEL_PEAK - CAPILLARY_PEAK)
    return Anatomy(params, size, pad, segs_px, seg_np, droppable, mesh, faz, field, shade, background, fovea_px,
                   vessel_peak)


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


def _non_perfusion_threshold(anat: Anatomy, stage: int) -> float:
    """Field value above which the patient is non-perfused at ``stage`` (inf: nothing is).

    The region is the top ``area`` of the field inside the image: nested, so it only
    shrinks as the extent does.
    """
    area = anat.params.area(stage)
    if area <= 0:
        return math.inf
    inner = anat.np_field[anat.pad:-anat.pad, anat.pad:-anat.pad]
    return max(float(np.quantile(inner, 1.0 - area)), 1e-12)


def _perfusion(anat: Anatomy, threshold: float) -> np.ndarray:
    """Capillary perfusion on the canvas: 1 where perfused, down to 0.2 in the sector's core."""
    return 1 - 0.8 * _smoothstep((anat.np_field / threshold - 1) / 0.25 + 0.5)


def non_perfused_fraction(anat: Anatomy, stage: int) -> float:
    """Share of the image (before mirroring) whose capillaries are dimmed more than halfway at ``stage``.

    Perfusion runs from 1 (perfused) to 0.2 (the sector's core), so halfway is 0.6.
    """
    perfusion = _perfusion(anat, _non_perfusion_threshold(anat, stage))
    return float(np.mean(perfusion[anat.pad:-anat.pad, anat.pad:-anat.pad] < 0.6))


def render_stage(anat: Anatomy, stage: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float 0..255, label bool) of one stage on the padded canvas, before per-exam effects."""
    canvas = anat.size + 2 * anat.pad
    t = _non_perfusion_threshold(anat, stage)
    keep = ~(anat.seg_droppable & (anat.seg_np > t))
    cover = _draw_vessels(anat.segs_px[keep], canvas)
    label = cover >= 0.35  # keeps 1-px vessels continuous where they fall between pixel centres
    caps = CAPILLARY_PEAK * anat.mesh * anat.faz * _perfusion(anat, t)
    vessels = anat.vessel_peak * ndimage.gaussian_filter(cover, 0.6 * anat.size / 304) ** 0.9
    img = anat.background + np.maximum(caps, vessels)
    img = img * anat.shade * anat.params.gain
    if anat.params.eye == "OS":  # left eye: the optic disc (and the nasal side) is on the left
        img, label = img[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(label)
