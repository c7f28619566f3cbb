"""The one reader of a clinic's manifest CSV, for ingest and for the source fingerprint alike.

The fingerprint decides whether a run or retrain may reuse what it made before, so it must
cover exactly the files ingest reads: a second parser that disagreed on a separator or a
header's case would hash the CSV alone and miss an image changed in place. Both therefore
read rows here and resolve paths with :func:`resolve_listed_path`.

Accepted: comma, semicolon or tab separated (sniffed), UTF-8 with or without a BOM (as Excel
writes it), header names in any case with surrounding spaces; required columns
patient_id, stage, image_path; optional label_path and exam_id. Every value is a string.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from storage.errors import InputDataError

MANIFEST_REQUIRED = ("patient_id", "stage", "image_path")
#: the columns that name input files (relative ones resolve against the manifest's folder)
PATH_COLUMNS = ("image_path", "label_path")
_SPREADSHEETS = {".xlsx", ".xls", ".xlsm"}


def _printable(text: str, limit: int = 120) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


def read_manifest_table(path: Path) -> pd.DataFrame:
    """The manifest as a table of strings with lower-case column names; InputDataError (one line) if unusable."""
    path = Path(path)
    if path.suffix.lower() in _SPREADSHEETS:
        raise InputDataError(f"{path} is a spreadsheet, not a manifest CSV; give the SOUL folder (holding "
                             "S1, S2, S3) or a CSV with columns patient_id, stage, image_path[, label_path]")
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise InputDataError(f"cannot read manifest {path} ({exc.strerror or exc})") from None
    if empty:
        raise InputDataError(f"manifest {path} is empty; it needs a header (patient_id, stage, image_path) and rows")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, sep=None,
                            engine="python", encoding="utf-8-sig")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, csv.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"cannot read manifest {path} as CSV ({_printable(first)})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in MANIFEST_REQUIRED if c not in table.columns]
    if missing:
        has = _printable(", ".join(table.columns[:10]), 80)
        raise InputDataError(f"manifest {path} lacks column(s) {', '.join(missing)} (has: {has}); "
                             "required: patient_id, stage, image_path")
    if table.empty:
        raise InputDataError(f"manifest {path} has a header but no rows")
    return table


def resolve_listed_path(manifest: Path, value: str) -> Path | None:
    """The file a manifest cell names: absolute, ``~`` expanded, relative to the manifest's folder; None if empty."""
    value = value.strip()
    if not value:
        return None
    return (Path(manifest).expanduser().absolute().parent / Path(value).expanduser()).absolute()


def listed_files(manifest: Path) -> list[tuple[str, Path]]:
    """(cell text, resolved path) of every file the manifest lists, each text once (missing files included)."""
    table = read_manifest_table(manifest)
    out: dict[str, Path] = {}
    for column in PATH_COLUMNS:
        if column not in table.columns:
            continue
        for value in table[column]:
            path = resolve_listed_path(manifest, value)
            if path is not None:
                out.setdefault(value.strip(), path)
    return list(out.items())
