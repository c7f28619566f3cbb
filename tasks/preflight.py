"""The checks every training step makes on RUN_DIR/soul.h5 before it trains.

Shared by Pix2Pix and CRGAN so both refuse a missing, invalid or wrong-size soul.h5
with the same one-line message; each model adds its own checks (held-out split,
checkpoint identity) after this.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from storage.errors import BrvoError
from storage.paired_format import validate
from storage.run_dir import RunPaths


def require_soul_h5(run_dir: str | os.PathLike, image_size: int, supports_size: Callable[[int], Any]) -> Path:
    """soul.h5's path once it exists, validates, holds ``image_size`` px images, and the model
    can be built at that size (``supports_size`` raises ValueError when not); else a BrvoError."""
    soul = RunPaths.of(run_dir).soul_h5
    if not soul.is_file():
        raise BrvoError(f"{soul}: not found; run preprocess first (brvo-augment preprocess {run_dir})")
    summary = validate(soul)  # DatasetFormatError: one line naming the problem
    if summary.image_size != image_size:
        raise BrvoError(f"{soul}: images are {summary.image_size} px but the config asks for {image_size} px; "
                        f"re-run preprocess with this config or use a config with image_size={summary.image_size}")
    try:
        supports_size(image_size)
    except ValueError as exc:
        raise BrvoError(f"{exc}; choose image_size 32, 64, 128, 256 or 512") from None
    return soul
