"""Drawing the report's pictures: per-patient timeline montages, score histograms, training curves."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from storage.atomic import atomic_path
from storage.paired_format import STAGE_NAMES

TILE = 128
REAL_BORDER = (40, 160, 60)
ACCEPTED_BORDER = (220, 40, 40)
REJECTED_BORDER = (150, 150, 150)
SCORE_ABBREVIATIONS = (("consistency_ssim", "ssim"), ("realism", "real"), ("density_z", "dz"),
                       ("label_confidence", "conf"))


@dataclass(frozen=True)
class MontageTile:
    """What one stage column of a timeline montage shows: an image, its label, and how it was made."""

    image: np.ndarray
    label: np.ndarray
    kind: str  # 'real', 'accepted' (synthetic, kept) or 'rejected' (synthetic, failed a threshold)
    caption: tuple[str, ...] = ()


def timeline_montage(tiles: dict[int, MontageTile], title: str, out_png: Path) -> Path:
    """Two rows (image, label) x six stages, each stage captioned with how its tile was made.

    Real stages are framed green; a synthetic stage shows one of its K samples, framed red when
    that sample was accepted and grey with REJECTED across it when it failed a threshold; its
    caption names the sample, how many of the K were accepted, and the shown sample's scores.
    Stages without a tile stay blank.
    """
    pad, head, line_height = 6, 34, 12
    captions = {stage: (name,) if tiles.get(stage) is None else (f"{name} {tiles[stage].kind}", *tiles[stage].caption)
                for stage, name in enumerate(STAGE_NAMES)}
    foot = 4 + line_height * max(len(lines) for lines in captions.values())  # every caption line fits
    width = len(STAGE_NAMES) * (TILE + pad) + pad
    height = head + 2 * (TILE + pad) + foot
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(0, 0, 0))
    draw.text((pad, 18), "frame: green real, red synthetic accepted, grey synthetic rejected", fill=(90, 90, 90))
    for stage, name in enumerate(STAGE_NAMES):
        x = pad + stage * (TILE + pad)
        tile = tiles.get(stage)
        for i, line in enumerate(captions[stage]):
            draw.text((x + 2, head + 2 * (TILE + pad) + 1 + line_height * i), line, fill=(0, 0, 0))
        if tile is None:
            for row in range(2):
                y = head + row * (TILE + pad)
                draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=(200, 200, 200))
            continue
        colour = {"real": REAL_BORDER, "accepted": ACCEPTED_BORDER}.get(tile.kind, REJECTED_BORDER)
        for row, arr in enumerate((tile.image, (np.asarray(tile.label) * 255).astype(np.uint8))):
            y = head + row * (TILE + pad)
            img = Image.fromarray(np.asarray(arr, np.uint8)).resize((TILE - 4, TILE - 4), Image.Resampling.NEAREST)
            canvas.paste(ImageOps.expand(img.convert("RGB"), border=2, fill=colour), (x, y))
            if tile.kind == "rejected":
                draw.text((x + 8, y + 6), "REJECTED", fill=(255, 200, 0))
    with atomic_path(out_png) as tmp:  # a full disk: DiskFullError, no half PNG
        canvas.save(tmp, format="PNG")
    return out_png


def stage_tile(rows: pd.DataFrame, images: h5py.Dataset, labels: h5py.Dataset) -> MontageTile:
    """The tile of one (patient, stage): its first real exam, else its first accepted synthetic sample
    (sample 0 when none was accepted), captioned with the sample's index, the stage's acceptance count
    and the shown sample's scores."""
    real = rows[~rows["is_synthetic"]]
    if len(real):
        row = int(real.index[0])
        return MontageTile(images[row], labels[row], "real", (f"exam {real['exam_id'].iloc[0]}",))
    samples = rows.sort_values("sample_index")
    accepted = samples[samples["accepted"]]
    shown = accepted.iloc[0] if len(accepted) else samples.iloc[0]
    row = int(shown.name)
    scores = " ".join(f"{short} {shown[name]:.2f}" for name, short in SCORE_ABBREVIATIONS[:2])
    more = " ".join(f"{short} {shown[name]:.2f}" for name, short in SCORE_ABBREVIATIONS[2:])
    return MontageTile(images[row], labels[row], "accepted" if bool(shown["accepted"]) else "rejected",
                       (f"sample {int(shown['sample_index'])}, {len(accepted)}/{len(samples)} acc.", scores, more))


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
    with atomic_path(out_png) as tmp:  # a full disk: DiskFullError, no half PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png


def training_curves(histories: dict[str, list[dict[str, float]]], out_png: Path) -> Path | None:
    """Per model (columns): training losses on top, validation metrics below, against the training clock.

    Only models trained in this run have a history (a registry version's curves belong to the run
    that trained it); with none, no figure is written and None is returned, so the report does not
    show an empty picture.

    Losses live on scales that differ by orders of magnitude (a weighted L1 of 50 beside a
    discriminator loss of 0.6), so each is drawn relative to its first value on a log axis, with
    its first and last values in the legend. PSNR (dB) gets its own axis beside the [0, 1] scores.
    A dashed line marks the validation that chose the kept checkpoint (highest val_score).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {model: history for model, history in histories.items() if history}
    if not histories:
        return None
    fig, axes = plt.subplots(2, len(histories), figsize=(6 * len(histories), 6.6), squeeze=False)
    for col, (model, history) in enumerate(histories.items()):
        top, bottom = axes[0, col], axes[1, col]
        frame = pd.DataFrame(history)
        clock = "step" if "step" in frame else "epoch"
        x = frame[clock]
        bookkeeping = ("epoch", "seconds", "seconds_validating", "step", "total_steps", "lr_factor")  # not losses
        losses = [c for c in frame.columns if c not in bookkeeping and not c.startswith("val_")]
        vals = [c for c in frame.columns if c.startswith("val_") and c not in ("val_score", "val_threshold", "val_mse")]
        for c in losses:
            first = frame[c].iloc[0]
            if not np.isfinite(first) or first == 0:
                continue
            top.plot(x, (frame[c] / first).abs(), label=f"{c} ({first:.3g} -> {frame[c].iloc[-1]:.3g})", marker=".")
        top.set_yscale("log")
        top.set_ylabel("loss / its first value")
        top.set_title(f"{model}: training losses")
        top.legend(fontsize=7)
        twin = None
        for i, c in enumerate(vals):
            ax = bottom
            if c == "val_psnr":  # dB, on its own axis
                twin = twin or bottom.twinx()
                ax = twin
            ax.plot(x, frame[c], label=c, marker=".", color=f"C{i}")
            ax.set_ylabel(c if ax is twin else "")
        if "val_score" in frame:
            best = frame.loc[frame["val_score"].idxmax()]
            for ax in (top, bottom):
                ax.axvline(best[clock], color="0.3", linestyle="--", linewidth=1)
            bottom.set_title(f"{model}: validation (dashed: {clock} {best[clock]:g}, the kept checkpoint)")
        else:
            bottom.set_title(f"{model}: validation")
        bottom.set_xlabel(clock)
        handles = [h for ax in (bottom, twin) if ax is not None for h in ax.get_legend_handles_labels()[0]]
        bottom.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:  # a full disk: DiskFullError, no half PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png
