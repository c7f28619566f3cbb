"""The timeline figure: one patient's six stages from any SOUL-layout tree, images above labels.

Why: the README shows what the phantom looks like, and a user checking a dataset
(the phantom or a clinic's own SOUL copy) wants to see one patient's follow-up at a
glance. It reads the files on disk, so it shows what was written, not what was meant.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from brvo_models.phantom.soul_layout import stage_dir
from storage.errors import BrvoError
from storage.paired_format import STAGE_NAMES


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
