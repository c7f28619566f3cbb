"""Pictures for the report: per-patient timeline montages, score histograms, training curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from storage.paired_format import STAGE_NAMES

TILE = 128
SYNTHETIC_BORDER = (220, 40, 40)
REAL_BORDER = (40, 160, 60)


def timeline_montage(stage_images: dict[int, tuple[np.ndarray, np.ndarray, bool]], title: str, out_png: Path) -> Path:
    """Two rows (image, label) x six stages; synthetic stages framed red and marked 'synthetic'.

    ``stage_images[stage] = (image uint8 HxW, label 0/1 HxW, is_synthetic)``; missing stages stay blank.
    """
    pad, head = 6, 22
    width = len(STAGE_NAMES) * (TILE + pad) + pad
    height = head + 2 * (TILE + pad) + pad + 14
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(0, 0, 0))
    for stage, name in enumerate(STAGE_NAMES):
        x = pad + stage * (TILE + pad)
        entry = stage_images.get(stage)
        caption = name if entry is None else f"{name} {'synthetic' if entry[2] else 'real'}"
        draw.text((x + 2, height - 14), caption, fill=(0, 0, 0))
        if entry is None:
            for row in range(2):
                y = head + row * (TILE + pad)
                draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=(200, 200, 200))
            continue
        image, label, synthetic = entry
        colour = SYNTHETIC_BORDER if synthetic else REAL_BORDER
        for row, arr in enumerate((image, (np.asarray(label) * 255).astype(np.uint8))):
            y = head + row * (TILE + pad)
            tile = Image.fromarray(np.asarray(arr, np.uint8)).resize((TILE - 4, TILE - 4), Image.Resampling.NEAREST)
            tile = ImageOps.expand(tile.convert("RGB"), border=2, fill=colour)
            canvas.paste(tile, (x, y))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def score_histograms(scores: pd.DataFrame, thresholds: dict[str, tuple[float | None, float | None]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(thresholds)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        v = scores[name].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=30, color="#4477aa")
        lo, hi = thresholds[name]
        for t in (lo, hi):
            if t is not None:
                ax.axvline(t, color="#cc3311", linestyle="--", label="threshold")
        ax.set_title(name)
    fig.suptitle("Synthetic sample scores (dashed: acceptance thresholds)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def training_curves(histories: dict[str, list[dict[str, float]]], out_png: Path) -> Path:
    """Per model (columns): training losses on top, validation metrics below, against the epoch.

    Losses and validation scores live on different scales, so they get separate panels; PSNR (dB)
    gets its own axis beside the [0, 1] scores, and MSE is left out (PSNR carries it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(histories))
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 6.4), squeeze=False)
    for col, (model, history) in enumerate(histories.items()):
        top, bottom = axes[0, col], axes[1, col]
        if not history:
            top.set_title(f"{model}: no history")
            bottom.set_axis_off()
            continue
        frame = pd.DataFrame(history)
        bookkeeping = ("epoch", "seconds", "seconds_validating", "step", "total_steps", "lr_factor")  # fit's history columns that are no loss
        losses = [c for c in frame.columns if c not in bookkeeping and not c.startswith("val_")]
        vals = [c for c in frame.columns if c.startswith("val_") and c not in ("val_score", "val_threshold", "val_mse")]
        for c in losses:
            top.plot(frame["epoch"], frame[c], label=c, marker=".")
        top.set_title(f"{model}: training losses")
        top.set_yscale("symlog", linthresh=1.0)
        top.legend(fontsize=7)
        twin = None
        for i, c in enumerate(vals):
            ax = bottom
            if c == "val_psnr":  # dB, on its own axis
                twin = twin or bottom.twinx()
                ax = twin
            ax.plot(frame["epoch"], frame[c], label=c, marker=".", color=f"C{i}")
            ax.set_ylabel(c if ax is twin else "")
        bottom.set_title(f"{model}: validation (best checkpoint = highest val score)")
        bottom.set_xlabel("epoch")
        handles = [h for ax in (bottom, twin) if ax is not None for h in ax.get_legend_handles_labels()[0]]
        bottom.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
