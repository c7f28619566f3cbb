"""Judge the filled stages against the truth they stand for: the scans a phantom's patients missed.

Why: a filled (patient, stage) is a guess at a visit that never happened. On a phantom that
visit can be rendered (:mod:`brvo_models.phantom.truth`: repeat scans of each missed pair),
so the fill can be compared with it directly instead of through held-out observed stages or
Pix2Pix labels. Every measure stands beside what a user gets without a model and beside
what no model can beat:

- baselines: nearest-stage copy (the mean image of the nearest observed stage, ties to the
  earlier; last observation carried) and neighbour mean (the mean of the two neighbouring
  observed stages' mean images; at an end, the nearest);
- ceilings: a real repeat scan (another truth scan against the true scan) and the oracle
  (the mean of the other truth scans).

Gaps are judged in kinds, never pooled alone: ``interior`` (a stage between two observed
ones: interpolation), ``after_last`` (after the patient's last visit: extrapolation, SOUL's
common case) and ``before_first``.

The course of the disease is read with an image biomarker that works on any image (a real
scan, a sample, a mean of samples), :func:`non_perfusion_index`, and on labels with
:func:`vessel_density`; its change from the nearest observed stage is compared, synthetic
against true. Plain functions on arrays (no Prefect, no files): ``benchmarks/fill_truth.py``
reads a run and a truth dir and calls them.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brvo_models.metrics import psnr, ssim, tolerant_cldice, tolerant_dice

GAP_KINDS = ("interior", "after_last", "before_first")
#: Image estimates of a missed stage (compared with the true scan), then the baselines and the ceilings.
ESTIMATES = ("zero_noise", "mean_of_samples", "one_sample")
BASELINES = ("nearest_copy", "neighbour_mean")
CEILINGS = ("repeat_scan", "oracle")
#: Course estimates per biomarker: the fill's, the baselines', and one real scan of the true stage.
COURSE_ESTIMATES = {"non_perfusion": ("samples", "zero_noise", "mean_of_samples", "neighbour_mean", "nearest_copy",
                                      "true_scan"),
                    "vessel_density": ("samples", "neighbour_mean", "nearest_copy", "true_scan")}
LABEL_SOURCES = ("samples", "nearest_copy", "repeat_scan")

#: non_perfusion_index's settings, as fractions of the image (so 64, 128 and 304 px read alike).
NP_SMOOTH = 0.03          # Gaussian sigma of the flow signal, times the image side
NP_THRESHOLD = 0.65       # non-perfused: below this share of the image's own perfused level
NP_LEVEL_QUANTILE = 75    # the perfused level: this percentile (vessels clipped to it first)
NP_STRIPE_WINDOW = 0.1    # rows' running median window for motion lines, times the image side


# ------------------------------------------------------------------------------------------------ biomarkers

def _remove_line_artefacts(image: np.ndarray) -> np.ndarray:
    """Rescale each row to the running median of its neighbours' row medians: a full-width motion line
    (bright or dark, 1-2 rows) takes its neighbours' level; a region many rows tall keeps its own."""
    rows = np.median(image, axis=1)
    window = max(3, int(round(NP_STRIPE_WINDOW * len(rows))) | 1)
    smooth = ndimage.median_filter(rows, size=window, mode="nearest")
    return image * (smooth / np.maximum(rows, 1e-6))[:, None]


def non_perfusion_index(image: np.ndarray) -> float:
    """Percent of the image whose heavily smoothed flow signal is below 65 % of the image's own perfused level.

    Why this form: non-perfusion in OCTA is capillary signal lost over an area, so it is read
    on a scale far above the capillaries (sigma 3 % of the side), after vessels are clipped to
    the perfused level (a large vessel crossing a dropout must not fill it in) and motion lines
    are evened out. The level is the image's own 75th percentile, so gain, device and size do
    not matter; it reads a single scan, a synthetic sample or a mean of them in the same units.
    The foveal avascular zone counts too (a per-patient constant that cancels in changes).
    """
    x = np.asarray(image, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected one (H, W) image, got shape {x.shape}")
    x = _remove_line_artefacts(x)
    level = np.percentile(x, NP_LEVEL_QUANTILE)
    flow = ndimage.gaussian_filter(np.minimum(x, level), NP_SMOOTH * min(x.shape), mode="nearest")
    return float(100.0 * np.mean(flow < NP_THRESHOLD * np.percentile(flow, NP_LEVEL_QUANTILE)))


def vessel_density(label: np.ndarray) -> float:
    """Percent of the image labelled vessel (any non-zero pixel)."""
    return float(100.0 * np.mean(np.asarray(label) != 0))


# ------------------------------------------------------------------------------------------------ which stages

def gap_kind(observed: Collection[int], stage: int) -> str:
    """'interior' (observed stages on both sides), 'after_last' or 'before_first'."""
    if not observed:
        raise ValueError("a patient with no observed stage has no gap to judge")
    if stage > max(observed):
        return "after_last"
    if stage < min(observed):
        return "before_first"
    return "interior"


def nearest_observed(observed: Collection[int], stage: int) -> int:
    """The observed stage closest to ``stage``; a tie goes to the earlier (the last observation carried)."""
    return min(observed, key=lambda s: (abs(s - stage), s))


def neighbour_stages(observed: Collection[int], stage: int) -> tuple[int, ...]:
    """(previous, next) observed stages around an interior gap; (nearest,) at an end."""
    before = [s for s in observed if s < stage]
    after = [s for s in observed if s > stage]
    if before and after:
        return (max(before), min(after))
    return (nearest_observed(observed, stage),)


# ------------------------------------------------------------------------------------------------ one pair

@dataclass
class PairInputs:
    """Everything about one filled (patient, stage), at the run's image size.

    Images in grey levels 0..255 (uint8 or float: a mean image is fine); labels 0/1 or bool.
    ``truth_images[0]`` is the true scan, the others are repeat scans of the same stage.
    ``zero_noise``: the model's zero-noise estimate, None when not available.
    """
    patient_id: str
    stage: int
    observed_images: Mapping[int, np.ndarray]   # stage -> (n, H, W) the patient's real scans
    observed_labels: Mapping[int, np.ndarray]   # stage -> (n, H, W)
    truth_images: np.ndarray                    # (R, H, W), R >= 3
    truth_labels: np.ndarray                    # (R, H, W)
    samples: np.ndarray                         # (K, H, W) the synthetic rows' images
    sample_labels: np.ndarray                   # (K, H, W) the synthetic rows' labels
    zero_noise: np.ndarray | None = None        # (H, W)
    true_area: float | None = None              # the phantom's non-perfused fraction at ``stage``
    nearest_true_area: float | None = None      # ... and at the nearest observed stage


def _unit(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float64) / 255.0


def _image_scores(estimate: np.ndarray, true_scan: np.ndarray) -> tuple[float, float]:
    a, b = _unit(estimate), _unit(true_scan)
    return ssim(a, b), psnr(a, b)


def _mean_scores(estimates: Sequence[np.ndarray], true_scan: np.ndarray) -> tuple[float, float]:
    scores = [_image_scores(e, true_scan) for e in estimates]
    return float(np.mean([s for s, _ in scores])), float(np.mean([p for _, p in scores]))


def _label_scores(labels: Sequence[np.ndarray], truth: np.ndarray) -> dict[str, float]:
    return {"tolerant_dice": float(np.mean([tolerant_dice(lab, truth) for lab in labels])),
            "tolerant_cldice": float(np.mean([tolerant_cldice(lab, truth) for lab in labels]))}


def evaluate_pair(pair: PairInputs) -> dict:
    """One filled pair against its truth: SSIM/PSNR of every estimate, baseline and ceiling with the true scan,
    the biomarkers' values (the course is their change from ``reference``), and the labels' agreement."""
    if len(pair.truth_images) < 3:
        raise ValueError(f"patient {pair.patient_id} stage {pair.stage}: {len(pair.truth_images)} truth scans, "
                         "need the true scan and at least two repeats (repeat-scan ceiling and oracle)")
    if len(pair.samples) == 0 or len(pair.samples) != len(pair.sample_labels):
        raise ValueError(f"patient {pair.patient_id} stage {pair.stage}: {len(pair.samples)} samples with "
                         f"{len(pair.sample_labels)} labels")
    observed = sorted(int(s) for s, imgs in pair.observed_images.items() if len(imgs))
    nearest = nearest_observed(observed, pair.stage)
    neighbours = neighbour_stages(observed, pair.stage)
    stage_mean = {s: np.asarray(pair.observed_images[s], np.float64).mean(0) for s in neighbours + (nearest,)}
    true_scan, repeats = pair.truth_images[0], pair.truth_images[1:]
    true_label, repeat_labels = pair.truth_labels[0], pair.truth_labels[1:]
    samples = np.asarray(pair.samples)

    images = {
        "zero_noise": pair.zero_noise,
        "mean_of_samples": samples.astype(np.float64).mean(0),
        "nearest_copy": stage_mean[nearest],
        "neighbour_mean": np.mean([stage_mean[s] for s in neighbours], axis=0),
        "oracle": repeats.astype(np.float64).mean(0),
    }
    ssims, psnrs = {}, {}
    for name, image in images.items():
        ssims[name], psnrs[name] = (None, None) if image is None else _image_scores(image, true_scan)
    ssims["one_sample"], psnrs["one_sample"] = _mean_scores(samples, true_scan)
    ssims["repeat_scan"], psnrs["repeat_scan"] = _mean_scores(repeats, true_scan)

    def per_image(fn, stack) -> float:
        return float(np.mean([fn(x) for x in stack]))

    npi = non_perfusion_index
    non_perfusion = {
        "reference": per_image(npi, pair.observed_images[nearest]),
        "true": per_image(npi, pair.truth_images),
        "true_scan": npi(true_scan),
        "samples": per_image(npi, samples),
        "zero_noise": None if pair.zero_noise is None else npi(pair.zero_noise),
        "mean_of_samples": npi(images["mean_of_samples"]),
        "neighbour_mean": float(np.mean([per_image(npi, pair.observed_images[s]) for s in neighbours])),
    }
    density = {
        "reference": per_image(vessel_density, pair.observed_labels[nearest]),
        "true": per_image(vessel_density, pair.truth_labels),
        "true_scan": vessel_density(true_label),
        "samples": per_image(vessel_density, pair.sample_labels),
        "neighbour_mean": float(np.mean([per_image(vessel_density, pair.observed_labels[s]) for s in neighbours])),
    }
    for values in (non_perfusion, density):
        values["nearest_copy"] = values["reference"]
    labels = {"samples": _label_scores(pair.sample_labels, true_label),
              "nearest_copy": _label_scores(pair.observed_labels[nearest], true_label),
              "repeat_scan": _label_scores(repeat_labels, true_label)}
    area = None
    if pair.true_area is not None and pair.nearest_true_area is not None:
        area = {"stage": 100.0 * pair.true_area, "nearest": 100.0 * pair.nearest_true_area}
    return {"patient_id": str(pair.patient_id), "stage": int(pair.stage), "kind": gap_kind(observed, pair.stage),
            "nearest": nearest, "neighbours": list(neighbours), "n_samples": len(samples),
            "n_truth_scans": len(pair.truth_images), "ssim": ssims, "psnr": psnrs,
            "non_perfusion": non_perfusion, "vessel_density": density, "labels": labels, "true_area_pct": area}


# ------------------------------------------------------------------------------------------------ summaries

def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept and len(kept) == len(values) else None


def course_fit(synthetic_change: np.ndarray, true_change: np.ndarray) -> dict[str, float | None]:
    """How a synthetic change tracks the true one: slope through the origin (the share of the course carried),
    slope and intercept of a line, mean offset (synthetic - true) and MAE."""
    x, y = np.asarray(true_change, np.float64), np.asarray(synthetic_change, np.float64)
    out: dict[str, float | None] = {"slope_through_origin": None, "slope": None, "intercept": None,
                                    "offset": float(np.mean(y - x)) if len(x) else None,
                                    "mae": float(np.mean(np.abs(y - x))) if len(x) else None}
    if len(x) and float(x @ x) > 0:
        out["slope_through_origin"] = float(x @ y / (x @ x))
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        out["slope"], out["intercept"] = float(slope), float(intercept)
    return out


def _course(rows: list[dict], biomarker: str) -> dict:
    ref = np.array([r[biomarker]["reference"] for r in rows])
    true_change = np.array([r[biomarker]["true"] for r in rows]) - ref
    steps = np.array([abs(r["stage"] - r["nearest"]) for r in rows])
    out: dict = {"true_change_mean": float(true_change.mean()),
                 "true_change_per_stage": float(np.mean(np.abs(true_change) / steps))}
    areas = [r["true_area_pct"] for r in rows]
    if all(a is not None for a in areas):
        area_change = np.array([a["stage"] - a["nearest"] for a in areas])
        out["true_area_change_mean"] = float(area_change.mean())
        out["biomarker_vs_area"] = course_fit(true_change, area_change)
    for name in COURSE_ESTIMATES[biomarker]:
        values = [r[biomarker][name] for r in rows]
        if any(v is None for v in values):
            out[name] = None
            continue
        out[name] = course_fit(np.array(values) - ref, true_change)
    return out


def _summary(rows: list[dict]) -> dict:
    ssims = {name: _mean([r["ssim"][name] for r in rows]) for name in ESTIMATES + BASELINES + CEILINGS}
    psnrs = {name: _mean([r["psnr"][name] for r in rows]) for name in ESTIMATES + BASELINES + CEILINGS}
    best_name = max(BASELINES, key=lambda n: ssims[n])
    best, oracle = ssims[best_name], ssims["oracle"]
    gap = {name: None if ssims[name] is None or oracle - best <= 0 else (ssims[name] - best) / (oracle - best)
           for name in ESTIMATES + BASELINES + CEILINGS}
    labels = {source: {m: float(np.mean([r["labels"][source][m] for r in rows]))
                       for m in ("tolerant_dice", "tolerant_cldice")} for source in LABEL_SOURCES}
    return {"n_pairs": len(rows), "n_patients": len({r["patient_id"] for r in rows}),
            "n_samples": int(sum(r["n_samples"] for r in rows)),
            "stages": {str(s): sum(r["stage"] == s for r in rows) for s in sorted({r["stage"] for r in rows})},
            "ssim": ssims, "psnr": psnrs, "best_baseline": best_name, "gap_closed": gap,
            "course": {b: _course(rows, b) for b in COURSE_ESTIMATES}, "labels": labels}


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per gap kind present (and 'all'): mean SSIM/PSNR of every estimate, baseline and ceiling; the share of
    the SSIM gap closed, (estimate - best baseline) / (oracle - best baseline), from the means; the course
    fits per biomarker; the labels' tolerant Dice and clDice."""
    out = {kind: _summary([r for r in rows if r["kind"] == kind]) for kind in GAP_KINDS
           if any(r["kind"] == kind for r in rows)}
    if rows:
        out["all"] = _summary(rows)
    return out


# ------------------------------------------------------------------------------------------------ distribution

def image_features(images: np.ndarray, seed: int = 0):
    """Random-CNN features of uint8 images (N, H, W), as the pipeline's image_quality step extracts them
    (:class:`brvo_models.image_quality.RandomCNNFeatures`): extract once, compare many sets."""
    from brvo_models.image_quality import RandomCNNFeatures, extract_features

    return extract_features(RandomCNNFeatures(seed=seed), images)


def distribution(synthetic_features, held_out_features, train_features=None, truth_features=None,
                 real_vs_real: dict | None = None, all_samples_features=None) -> dict:
    """KID and precision/recall against held-out real images, pooled over stages
    (:func:`brvo_models.image_quality.compare_features`, the papers' settings): the synthetic rows, the real
    training images in their place (the real-vs-real ceiling; pass ``real_vs_real`` from an earlier call to
    reuse it, it does not depend on the synthetic rows) and, when given, the true scans of the same missed
    pairs (what a perfect fill of exactly these pairs would score). ``all_samples_features``: every sample,
    accepted or not, where the accepted ones are too few to compare (under 10)."""
    from brvo_models.image_quality import compare_features

    shown = ("n_real", "n_synthetic", "kid_mean", "kid_std", "precision", "recall", "reason")

    def against_held_out(features) -> dict:
        result = compare_features(held_out_features, features)
        return {k: result.get(k) for k in shown}

    if real_vs_real is None:
        if train_features is None:
            raise ValueError("give train_features or a real_vs_real result to compare with")
        real_vs_real = against_held_out(train_features)
    out = {"synthetic": against_held_out(synthetic_features), "real_vs_real": real_vs_real}
    if truth_features is not None:
        out["truth"] = against_held_out(truth_features)
    if all_samples_features is not None:
        out["all_samples"] = against_held_out(all_samples_features)
    return out


# ------------------------------------------------------------------------------------------------ the bars

#: Kinds each bar is judged on, each on its own.
JUDGED_KINDS = ("interior", "after_last")


def bars(summary: Mapping[str, dict], distributions: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """The rules a fill must meet against the truth, fixed before any number was seen, per judged gap kind:

    - estimate: the zero-noise estimate or the mean of the K samples closes >= half the SSIM gap;
    - samples: one sample's SSIM with the true scan is within 0.03 of a real repeat scan's;
    - course: the samples carry 80-125 % of the true change in the non-perfusion index, with a mean
      offset under a quarter of one stage's true change;
    - labels: 1-px tolerant Dice with the true label within 0.03 of a repeat scan's label;
    - distribution: KID of the accepted samples <= 1.5 x the real-vs-real ceiling (a ceiling <= 0 asks
      for KID <= 0) and recall >= 0.8 x the ceiling's.

    Returns {name: {met: bool | None, value, rule}}; met is None where the measure is undefined.
    """
    out: dict[str, dict] = {}
    for kind in JUDGED_KINDS:
        if kind not in summary:
            continue
        s = summary[kind]
        closed = [v for v in (s["gap_closed"]["zero_noise"], s["gap_closed"]["mean_of_samples"]) if v is not None]
        out[f"{kind}.estimate"] = {"met": None if not closed else max(closed) >= 0.5,
                                   "value": max(closed) if closed else None,
                                   "rule": "zero-noise or mean-of-samples estimate closes >= 50 % of the SSIM gap"}
        gap = s["ssim"]["repeat_scan"] - s["ssim"]["one_sample"]
        out[f"{kind}.samples"] = {"met": gap <= 0.03, "value": gap,
                                  "rule": "one sample's SSIM with the true scan >= a repeat scan's - 0.03"}
        course = s["course"]["non_perfusion"]
        fit = course["samples"]
        carried = fit["slope_through_origin"]
        quarter = course["true_change_per_stage"] / 4
        out[f"{kind}.course"] = {
            "met": None if carried is None else bool(0.8 <= carried <= 1.25 and abs(fit["offset"]) < quarter),
            "value": {"carried": carried, "offset": fit["offset"], "quarter_stage": quarter},
            "rule": "samples carry 80-125 % of the true change in the non-perfusion index, |offset| < a quarter "
                    "of one stage's true change"}
        lab = s["labels"]
        dice_gap = lab["repeat_scan"]["tolerant_dice"] - lab["samples"]["tolerant_dice"]
        out[f"{kind}.labels"] = {"met": dice_gap <= 0.03, "value": dice_gap,
                                 "rule": "1-px tolerant Dice with the true label >= a repeat scan's - 0.03"}
        if distributions and kind in distributions:
            d = distributions[kind]
            kid, kid_ceiling = d["synthetic"]["kid_mean"], d["real_vs_real"]["kid_mean"]
            recall, recall_ceiling = d["synthetic"]["recall"], d["real_vs_real"]["recall"]
            numbers = (kid, kid_ceiling, recall, recall_ceiling)
            defined = all(v is not None and not math.isnan(v) for v in numbers)
            out[f"{kind}.distribution"] = {
                "met": bool(kid <= 1.5 * max(kid_ceiling, 0.0) and recall >= 0.8 * recall_ceiling) if defined
                else None,
                "value": {"kid": kid, "kid_ceiling": kid_ceiling, "recall": recall, "recall_ceiling": recall_ceiling},
                "rule": "KID <= 1.5 x real-vs-real and recall >= 0.8 x real-vs-real"}
    return out


# ------------------------------------------------------------------------------------------------ the table

def _fmt(value, digits: int = 3, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.0f} %" if pct else f"{value:.{digits}f}"


#: Table columns: (header, image measure name, course estimate name, label source name).
_COLUMNS = (("zero-noise estimate", "zero_noise", "zero_noise", None),
            ("mean of K samples", "mean_of_samples", "mean_of_samples", None),
            ("one sample", "one_sample", "samples", "samples"),
            ("nearest copy", "nearest_copy", "nearest_copy", "nearest_copy"),
            ("neighbour mean", "neighbour_mean", "neighbour_mean", None),
            ("repeat scan", "repeat_scan", "true_scan", "repeat_scan"),
            ("oracle", "oracle", None, None))


def _row(title: str, cells) -> str:
    return f"| {title} | " + " | ".join(cells) + " |"


def markdown_table(summary: Mapping[str, dict], distributions: Mapping[str, dict] | None = None,
                   bar_results: Mapping[str, dict] | None = None) -> str:
    """One table per gap kind (every measure beside its baselines and ceilings), then the distribution and the
    bars: what docs/fill-truth.md shows. For the course, "one sample" is the mean over samples of each
    sample's change, "mean of K samples" the change read on their mean image, "repeat scan" one real scan
    of the true stage (the true change is the mean over all truth scans)."""
    blocks = []
    for kind, s in summary.items():
        lines = [f"**{kind.replace('_', ' ')}**: {s['n_pairs']} pairs of {s['n_patients']} patients, "
                 f"{s['n_samples']} samples; best baseline: {s['best_baseline'].replace('_', ' ')}", "",
                 _row("measure", [c[0] for c in _COLUMNS]), "|---" * (len(_COLUMNS) + 1) + "|",
                 _row("SSIM vs true scan", [_fmt(s["ssim"][c[1]]) for c in _COLUMNS]),
                 _row("PSNR vs true scan (dB)", [_fmt(s["psnr"][c[1]], 2) for c in _COLUMNS]),
                 _row("share of the SSIM gap closed", [_fmt(s["gap_closed"][c[1]], pct=True) for c in _COLUMNS])]
        for biomarker, unit in (("non_perfusion", "non-perfusion index"), ("vessel_density", "label vessel density")):
            c = s["course"][biomarker]

            def fit(name, key, pct=False):
                value = c.get(name) if name else None
                return "" if value is None else _fmt(value[key], 2, pct)

            lines.append(_row(f"course in {unit}: share carried (true change {c['true_change_mean']:+.2f} pp, "
                              f"{c['true_change_per_stage']:.2f} pp a stage)",
                              [fit(col[2], "slope_through_origin", pct=True) for col in _COLUMNS]))
            lines.append(_row(f"course in {unit}: slope with intercept",
                              [fit(col[2], "slope") for col in _COLUMNS]))
            lines.append(_row(f"course in {unit}: offset / MAE (pp)",
                              [f"{fit(col[2], 'offset')} / {fit(col[2], 'mae')}" if col[2] and c.get(col[2]) else ""
                               for col in _COLUMNS]))
        for metric, title in (("tolerant_dice", "label Dice, 1 px tolerant"), ("tolerant_cldice", "label clDice, 1 px tolerant")):
            lines.append(_row(title, [_fmt(s["labels"][col[3]][metric]) if col[3] else "" for col in _COLUMNS]))
        blocks.append("\n".join(lines))
    if distributions:
        lines = ["**distribution** against held-out real images (random-CNN features, all stages pooled)", "",
                 "| gap kind | synthetic rows | KID: synthetic | KID: every sample | KID: real training (ceiling) | "
                 "KID: true scans | recall: synthetic | recall: every sample | recall: real training | "
                 "recall: true scans |", "|---" * 10 + "|"]
        for kind, d in distributions.items():
            truth, every = d.get("truth") or {}, d.get("all_samples") or {}
            lines.append(f"| {kind.replace('_', ' ')} | {d['synthetic']['n_synthetic']} {d.get('synthetic_rows', '')} | "
                         f"{_fmt(d['synthetic']['kid_mean'], 4)} | {_fmt(every.get('kid_mean'), 4)} | "
                         f"{_fmt(d['real_vs_real']['kid_mean'], 4)} | {_fmt(truth.get('kid_mean'), 4)} | "
                         f"{_fmt(d['synthetic']['recall'])} | {_fmt(every.get('recall'))} | "
                         f"{_fmt(d['real_vs_real']['recall'])} | {_fmt(truth.get('recall'))} |")
        blocks.append("\n".join(lines))
    if bar_results:
        lines = ["**bars**", "", "| bar | met | rule |", "|---|---|---|"]
        for name, bar in bar_results.items():
            met = {True: "yes", False: "**no**", None: "undefined"}[bar["met"]]
            lines.append(f"| {name} | {met} | {bar['rule']} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
