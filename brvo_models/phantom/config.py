"""The phantom's knobs: what varies between clinics, typed and range-checked.

Why: the demo preset was tuned on one 53-patient phantom, and a clinic's data will not
look like it (issue 11). Each knob below changes one thing a clinic's data differs in;
every default reproduces the demo phantom byte for byte, so existing runs, tests and
benchmarks keep their data. Multipliers are relative to the demo (1.0 = the demo).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from brvo_models.phantom.soul_layout import MAX_EXAMS, PAPER_N, PAPER_PATIENTS
from storage.errors import BrvoError

#: SOUL's share of patients seen at each stage: 48, 36, 37, 26, 20, 11 of 53.
SOUL_ATTENDANCE: tuple[float, ...] = tuple(c / PAPER_N for c in PAPER_PATIENTS)

Attendance = tuple[float, float, float, float, float, float]


class PhantomConfig(BaseModel):
    """Everything that decides a phantom's bytes (besides the code): size, seed and the clinic knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_patients: int = Field(53, ge=1, le=10_000, description="patients (SOUL has 53)")
    seed: int = Field(0, ge=0, description="every random draw derives from (seed, patient); same seed, same bytes")
    image_size: int = Field(304, ge=32, le=2048, description="side of the square images in px (SOUL's is 304)")
    images_per_visit: tuple[int, int] = Field(
        (1, MAX_EXAMS), description=f"repeat scans per attended visit, lo..hi within 1..{MAX_EXAMS}. A visit gets "
        "lo + Binomial(hi - lo, p_stage), where p_stage places SOUL's per-stage mean (4.4, 6.1, 5.1, 7.3, 6.0, 7.5 "
        "scans) in SOUL's 1..8 range; the default 1-8 is SOUL, 1-2 a clinic that scans once or twice")
    attendance: Attendance = Field(
        SOUL_ATTENDANCE, description="share of patients seen at each of the six stages, each in (0, 1]: how fast "
        "visits fall off over the treatment. Default SOUL's 48/36/37/26/20/11 of 53; counts are rounded, every "
        "patient attends at least one stage and, from 3 patients on, every stage has at least one patient")
    vessel_density: float = Field(
        1.0, ge=0.3, le=3.0, description="how much the vessel trees branch: branch spacing is divided by it and the "
        "number of small vessels entering from the image edges multiplied by it (more, denser small vessels)")
    vessel_width: float = Field(
        1.0, ge=0.5, le=2.5, description="multiplies every drawn vessel's width (image and label); the trees' "
        "layout is unchanged")
    contrast: float = Field(
        1.0, ge=0.0, le=1.5, description="how far vessels stand out above the capillary mesh: a vessel's peak is "
        "100 + 105 * contrast grey levels (the mesh peaks at 100, the background is 15-30); 0 = vessels no "
        "brighter than the densest capillaries")
    noise: float = Field(
        1.0, ge=0.0, le=3.0, description="acquisition noise per scan: multiplies the speckle (40 % multiplicative), "
        "the additive noise (sigma 5 grey levels) and the number of motion lines (0-3 per scan); 0 = clean scans")
    non_perfusion_size: float = Field(
        1.0, ge=0.0, le=3.0, description="multiplies each patient's non-perfused image fraction (12-26 % at full "
        "extent in the demo, shrinking as the patient reperfuses); 0 = no occluded sector")
    attendance_follows_response: float = Field(
        0.0, ge=0.0, le=1.0, description="course-dependent attendance: the weight of a patient's response (their "
        "reperfusion rate's rank) in who keeps coming, against chance. 0 = attendance ignores the course (the "
        "demo); 1 = poor responders are the first to stop coming. The stage counts stay `attendance`'s")

    @field_validator("images_per_visit", mode="before")
    @classmethod
    def _range_text(cls, value: Any) -> Any:
        """'1-2' or '3' (command line) as well as [1, 2] (JSON)."""
        if isinstance(value, str):
            parts = value.replace(" ", "").split("-")
            if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
                raise ValueError(f"expected LO-HI such as 1-2, got {value!r}")
            return (int(parts[0]), int(parts[-1]))
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError(f"expected [lo, hi], got {len(value)} numbers")
        return value

    @field_validator("images_per_visit")
    @classmethod
    def _range_bounds(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 1 <= lo <= hi <= MAX_EXAMS:
            raise ValueError(f"needs 1 <= lo <= hi <= {MAX_EXAMS}, got {lo}-{hi}")
        return value

    @field_validator("attendance", mode="before")
    @classmethod
    def _attendance_text(cls, value: Any) -> Any:
        """'0.9,0.7,0.7,0.5,0.4,0.2' (command line) as well as a JSON list."""
        if isinstance(value, str):
            try:
                value = tuple(float(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"expected six comma-separated shares, got {value!r}") from None
        if isinstance(value, (list, tuple)) and len(value) != 6:
            raise ValueError(f"expected six shares, one per stage (s1t1..s3t2), got {len(value)}")
        return value

    @field_validator("attendance")
    @classmethod
    def _attendance_bounds(cls, value: Attendance) -> Attendance:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"each stage's share must be in (0, 1], got {bad[0]}")
        return value

    def describe(self) -> str:
        """One line of the knobs that differ from the demo phantom ('demo phantom' when none do)."""
        default = PhantomConfig()
        changed = [f"{k}={v}" for k, v in self.model_dump().items()
                   if v != getattr(default, k) and k not in ("n_patients", "seed", "image_size")]
        return ", ".join(changed) or "demo phantom"


def phantom_config(base: PhantomConfig | None = None, **fields: Any) -> PhantomConfig:
    """``base`` (default: the demo phantom) with ``fields`` replaced; None keeps a field.

    A bad value is one line naming the field, its allowed range and the value given.
    """
    data = (base or PhantomConfig()).model_dump()
    data.update({k: v for k, v in fields.items() if v is not None})
    try:
        return PhantomConfig.model_validate(data)
    except ValidationError as exc:
        raise BrvoError(f"phantom config: {_problems(exc)}") from None


def load_phantom_config(path: str | Path) -> PhantomConfig:
    """A JSON object of PhantomConfig fields (any subset; the rest keep the demo's values)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BrvoError(f"{path}: cannot read phantom config ({exc}); pass a JSON object of PhantomConfig fields") \
            from None
    if not isinstance(data, dict):
        raise BrvoError(f"{path}: a phantom config is a JSON object of PhantomConfig fields, not a "
                        f"{type(data).__name__}")
    try:
        return PhantomConfig.model_validate(data)
    except ValidationError as exc:
        raise BrvoError(f"{path}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """pydantic's errors as '<field>: <what is wrong> (got <value>)', joined on one line."""
    out = []
    for e in exc.errors():
        field = ".".join(str(x) for x in e["loc"][:1]) or "config"
        if e["type"] == "extra_forbidden":
            out.append(f"unknown field {field!r}; fields are {', '.join(PhantomConfig.model_fields)}")
        elif e["type"] == "value_error":  # our validators' messages already name the value
            out.append(f"{field}: {e['ctx']['error']}")
        else:
            out.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(dict.fromkeys(out))
