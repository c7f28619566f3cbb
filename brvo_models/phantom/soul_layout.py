"""What the SOUL dataset (Xue et al. 2024) looks like on disk and in its Table 3.

The phantom imitates these facts; they live here once so the writer, the visit plan,
the config defaults and the timeline figure agree on them.
"""
from __future__ import annotations

from storage.paired_format import STAGE_NAMES

#: SOUL Table 3: patients and images per subset (of 53 patients).
PAPER_PATIENTS = (48, 36, 37, 26, 20, 11)
PAPER_IMAGES = (209, 219, 187, 189, 120, 99)
PAPER_N = 53
#: Most repeat scans SOUL has of one patient at one visit.
MAX_EXAMS = 8
#: The clinical sheet's file name, misspelt as in SOUL.
SHEET_NAME = "Infomation.xlsx"
#: Everything a SOUL root holds: the three surgery groups and the sheet.
SOUL_ENTRIES = frozenset({"S1", "S2", "S3", SHEET_NAME})


def stage_dir(stage: int) -> str:
    """'S2/s2t1' for stage 2: the SOUL subset folder of a stage index 0..5."""
    return f"S{stage // 2 + 1}/{STAGE_NAMES[stage]}"
