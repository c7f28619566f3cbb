"""The phantom's ``Infomation.xlsx``: SOUL's two clinical sheets, with values that follow the anatomy.

Why: ingest reads SOUL's sheet, and a phantom without one would not exercise that path.
Dates respect the treatment order, and CMT and BCVA improve as the non-perfusion
extent shrinks, so the sheet is consistent with the images.
"""
from __future__ import annotations

import datetime as _dt
import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from storage.paired_format import STAGE_NAMES


def clinical_sheets(seed: int, exam_ids: Sequence[Sequence[tuple[str, ...]]], info: list[dict]
                    ) -> dict[str, pd.DataFrame]:
    """Plausible 'basic_info' and 'image_info' sheets: dates, CMT and BCVA that follow the non-perfusion extent.

    ``exam_ids[p][s]`` are patient p's exam ids at stage s; ``info[p]`` has the patient's
    'eye', 'quadrant' and per-stage 'extent'.
    """
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


#: The time the phantom writes into its sheet (docProps and every zip entry), so its bytes depend on the data only.
WRITE_STAMP = "2024-01-01T00:00:00Z"
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)
_CORE_TIME = re.compile(rb"<dcterms:(created|modified)[^>]*>([^<]*)<")


def write_xlsx_deterministic(sheets: dict[str, pd.DataFrame], path: Path) -> None:
    """Write an xlsx whose bytes depend only on the data (openpyxl stamps 'now' into docProps and the zip)."""
    buf = io.BytesIO()
    with pd.ExcelWriter(buf, engine="openpyxl") as writer:
        for name, df in sheets.items():
            df.to_excel(writer, sheet_name=name, index=False)
    fixed = WRITE_STAMP.encode()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>" + fixed, data)
            info = zipfile.ZipInfo(item.filename, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)


def is_phantom_sheet(path: Path) -> bool:
    """True when the workbook at ``path`` was written by :func:`write_xlsx_deterministic`: created and modified
    at :data:`WRITE_STAMP` and every zip entry dated the same.

    Why the sheet tells: the phantom's tree is SOUL's layout, byte for byte reproducible (its bytes are
    recorded), so it holds no marker file; its sheet is its one file whose writer stamps a fixed time, where
    a sheet saved by a person or a clinic's tool carries the time it was saved. Anything unreadable is not
    the phantom's (False), so a real dataset is never taken for it.
    """
    try:
        with zipfile.ZipFile(path) as workbook:
            times = dict(_CORE_TIME.findall(workbook.read("docProps/core.xml")))
            entries_stamped = all(item.date_time == _ZIP_TIME for item in workbook.infolist())
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    stamp = WRITE_STAMP.encode()
    return entries_stamped and times.get(b"created") == stamp and times.get(b"modified") == stamp
