"""Write a phantom as a SOUL directory, atomically: images, label twins and the clinical sheet.

Layout written (nothing else goes into ``out_dir``)::

    S1/s1t1/image/<pid>/<pid>_<examid>.jpg    image_size x image_size grayscale JPG (SOUL: 304)
    S1/s1t1/label/<pid>/<pid>_<examid>.jpg    vessel mask, 0/255, JPEG-lossy (binarise at 127)
    ... S1/s1t2, S2/s2t1, S2/s2t2, S3/s3t1, S3/s3t2
    Infomation.xlsx                           sheets 'basic_info' and 'image_info' (sic)

The tree is built in a temporary sibling directory and renamed into place, so a killed
run never leaves a half phantom at ``out_dir``. Patients are independent jobs; the
caller decides how to run them (``map_patients``: the builtin ``map`` or a process
pool's), and the bytes do not depend on that choice.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from brvo_models.phantom.acquisition import acquire_exam
from brvo_models.phantom.anatomy import build_anatomy, render_stage
from brvo_models.phantom.clinical_sheet import clinical_sheets, write_xlsx_deterministic
from brvo_models.phantom.config import PhantomConfig
from brvo_models.phantom.soul_layout import SHEET_NAME, SOUL_ENTRIES, stage_dir
from brvo_models.phantom.visit_plan import plan_visits
from storage.atomic import output_mode
from storage.errors import BrvoError
from storage.hashing import fsync_dir
from storage.paired_format import STAGE_NAMES

#: How patient jobs are run: ``map`` itself, or a pool's ``map`` (results in job order).
PatientMap = Callable[[Callable, Iterable], Iterable]


@dataclass(frozen=True)
class PatientJob:
    """One patient's share of the work: render and write every scan of every attended stage."""
    config: PhantomConfig
    index: int
    root: str
    exam_ids: tuple[tuple[str, ...], ...]  # per stage, () where the patient did not attend


class PhantomSummary(BaseModel):
    """What a phantom holds: counts per stage, in SOUL's Table 3 terms, and the config that made it."""
    out_dir: Path
    n_patients: int
    seed: int
    image_size: int
    n_images: int
    patients_per_stage: dict[str, int]
    images_per_stage: dict[str, int]
    full_timeline_patients: list[str]
    seconds: float
    config: PhantomConfig


def _save_jpg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path, format="JPEG", quality=95)


def write_patient(job: PatientJob) -> dict:
    """Render and write one patient's images and labels; return what the clinical sheet needs."""
    config = job.config
    anat = build_anatomy(config, job.index)
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
            rng = np.random.default_rng([config.seed, job.index, stage, k])
            image, label = acquire_exam(stage_img, stage_label, config.image_size, anat.pad, rng, config.noise)
            name = f"{pid}_{exam_id}.jpg"
            _save_jpg(image, img_dir / name)
            _save_jpg(label, lbl_dir / name)
    p = anat.params
    return {"eye": p.eye, "quadrant": p.quadrant, "extent": [p.extent(s) for s in range(6)]}


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work if ``out_dir`` may not be (re)placed: only an empty dir or, with overwrite, a phantom."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BrvoError(f"{out_dir} exists and is not a directory: choose another OUT_DIR")
    entries = {p.name for p in out_dir.iterdir()}
    if entries and not overwrite:
        raise BrvoError(f"{out_dir} is not empty: choose a new OUT_DIR or pass overwrite to replace a phantom")
    if not entries <= SOUL_ENTRIES:
        extra = sorted(entries - SOUL_ENTRIES)[:3]
        raise BrvoError(f"{out_dir} holds more than a SOUL tree ({', '.join(extra)}): refusing to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished tree onto ``out_dir``; an old phantom there is removed only after that."""
    tmp.chmod(output_mode(directory=True))  # mkdtemp makes it 0700; give it what mkdir would under the umask
    if not out_dir.exists():
        tmp.rename(out_dir)
    else:
        old = out_dir.with_name(f"{tmp.name}.old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    fsync_dir(out_dir.parent)


def write_phantom(out_dir: Path, config: PhantomConfig, *, overwrite: bool = False,
                  map_patients: PatientMap = map, log: Callable[[str], None] | None = None) -> PhantomSummary:
    """Write the phantom ``config`` describes into ``out_dir`` (see the module docstring) and return its counts.

    ``overwrite`` replaces an existing phantom (a directory holding only S1-S3 and the sheet).
    """
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    plan = plan_visits(config)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        jobs = [PatientJob(config, p, str(tmp), plan.exam_ids[p]) for p in range(config.n_patients)]
        log(f"phantom: rendering {config.n_patients} patients, {plan.n_images} exams ({config.describe()})")
        info = list(map_patients(write_patient, jobs))
        write_xlsx_deterministic(clinical_sheets(config.seed, plan.exam_ids, info), tmp / SHEET_NAME)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = PhantomSummary(
        out_dir=out_dir, n_patients=config.n_patients, seed=config.seed, image_size=config.image_size,
        n_images=plan.n_images,
        patients_per_stage={STAGE_NAMES[s]: int(plan.attendance[:, s].sum()) for s in range(6)},
        images_per_stage={STAGE_NAMES[s]: int(plan.exam_counts[:, s].sum()) for s in range(6)},
        full_timeline_patients=[str(p + 1) for p in range(config.n_patients) if plan.attendance[p].all()],
        seconds=round(time.perf_counter() - start, 2), config=config,
    )
    log(f"phantom: wrote {summary.n_images} images in {summary.seconds:.1f} s to {out_dir}; "
        f"patients per stage {summary.patients_per_stage}")
    return summary
