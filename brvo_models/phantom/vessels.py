"""One patient's retinal vessel trees as line segments (millimetres, widths in px).

Why procedural trees and not a texture: the label must be exact (it is the segment
set, drawn), vessels must taper and branch like the superficial plexus so a labeller
has something to learn, and a BRVO must be able to drop exactly the small vessels in
its sector. Coordinates are millimetres on the 6x6 mm scan, fovea near (0, 0),
+x nasal, +y inferior (image rows).
"""
from __future__ import annotations

import math

import numpy as np


class VesselTree:
    """Grows vessel trees as random walks that taper, branch and stop at the FAZ.

    ``density`` divides the distance between branches; 1.0 is the demo phantom.
    """

    def __init__(self, rng: np.random.Generator, faz_mm: float, fovea: tuple[float, float], px_per_mm: float,
                 density: float = 1.0):
        self.rng = rng
        self.faz = faz_mm
        self.fx, self.fy = fovea
        self.px = px_per_mm
        self.density = density
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
        next_branch = rng.uniform(0.3, 0.7) / self.density
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
                since_branch, next_branch = 0.0, rng.uniform(0.3, 0.8) / self.density
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


def _scaled_count(count: int, density: float) -> int:
    """How many of something there are at ``density`` (``count`` at 1.0, at least 1)."""
    return max(1, round(count * density))


def build_vessels(rng: np.random.Generator, faz_mm: float, fovea: tuple[float, float], px: float,
                  density: float = 1.0) -> np.ndarray:
    """All vessel segments of one patient: (n, 5) array x0, y0, x1, y1 (mm), width (px at output size).

    ``density`` shortens the spacing of sprouts along the arcades and of branches along
    every vessel, and multiplies the small vessels entering from the nasal and temporal
    edges; 1.0 is the demo phantom (the same random draws, the same segments).
    """
    tree = VesselTree(rng, faz_mm, fovea, px, density)
    for sign in (-1, 1):
        for k in range(2):  # artery + vein per arcade
            pts, widths = _arcade(rng, sign, px)
            if k:
                widths = widths * 0.8
            tree.add_path(pts, widths)
            idx = _scaled_count(int(rng.integers(15, 40)), 1 / density)
            while idx < len(pts) - 5:
                (x0, y0), (x1, y1) = pts[idx], pts[idx + 1]
                heading = math.atan2(y1 - y0, x1 - x0)
                inward = rng.random() < 0.65
                # the arcade runs nasal -> temporal (heading ~ pi); turning by +sign points at the fovea
                h = heading + (sign if inward else -sign) * rng.uniform(0.6, 1.3)
                tree.grow(float(x0), float(y0), h, widths[idx] * rng.uniform(0.45, 0.7),
                          pull=rng.uniform(0.4, 0.9) if inward else rng.uniform(0.0, 0.2))
                idx += _scaled_count(int(rng.integers(22, 45)), 1 / density)
    for _ in range(_scaled_count(int(rng.integers(6, 10)), density)):  # papillomacular branches from the nasal edge
        y0 = rng.uniform(-1.4, 1.4) + fovea[1]
        tree.grow(3.3, y0, math.pi + rng.normal(0, 0.25), rng.uniform(0.05, 0.08) * px, pull=rng.uniform(0.3, 0.7))
    for _ in range(_scaled_count(int(rng.integers(4, 8)), density)):  # temporal branches reaching over the raphe
        sign = 1 if rng.random() < 0.5 else -1
        tree.grow(-3.3, sign * rng.uniform(0.6, 2.0) + fovea[1], rng.normal(0, 0.3) - sign * 0.3,
                  rng.uniform(0.04, 0.06) * px, pull=rng.uniform(0.2, 0.5))
    return np.asarray(tree.segs, dtype=np.float64)
