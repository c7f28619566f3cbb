"""Do the synthetic rows help? The usefulness protocol, as plain functions.

Arms (data mixes) train the same downstream models (a vessel segmenter, a treatment-response
forecaster) with frozen recipes and are scored on real rows of held-out test patients, paired by
seed; a difference is real only by the rule declared before any number (:data:`RULE`).
:func:`run_protocol` returns the dict the report renders. docs/steps.md describes the arms, the
mix, the tasks and the rule; docs/usefulness.md has the measurements.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy import stats

from brvo_models.configs import AGREEMENT_QUANTILE, UsefulnessConfig
from storage.paired_format import STAGE_NAMES, read_arrays, read_meta

ALPHA = 0.05
RULE = ("a difference is real when the paired mean gain over seeds exceeds t(0.975, n-1) x its standard error "
        "(two-sided paired t-test at the 5 % level; n = seeds); gain = higher Dice / lower forecast error")
PRIMARY = {"segmentation": ("dice", True), "response": ("mae", False)}  # metric, higher is better
NO_DIFFERENCE = "no difference shown"
NOT_ENOUGH_SEEDS = "not enough seeds"
NOT_MEASURABLE = "not measurable here"
GATE_RULE = ("an arm is measurable on a task when real-only at the full train split beats real-only at the arm's size "
             "by the same paired rule (paired by seed, mean gain > t(0.975, n-1) x SE); for a full-data arm, whose "
             "size is the whole split, half the split stands in for the arm's size. Where it does not, real-only is "
             "saturated there and no added data can show a gain: the verdict is 'not measurable here'")
FULL_DATA = "full_data"
#: What a comparison's baseline is: the same real rows alone, or the cheapest use of the same information without
#: a generator (self-training for segmentation, interpolation for the course); the bar needs a gain over both.
BASELINE_ROLES = ("real_only", "same_information_alternative")


# ------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Rows:
    """Image/label rows with what the protocol needs of their meta (numpy arrays, aligned)."""

    images: np.ndarray        # uint8 (N, H, W)
    labels: np.ndarray        # uint8 0/1 (N, H, W)
    patient_id: np.ndarray    # str (N,)
    stage: np.ndarray         # int (N,)
    is_synthetic: np.ndarray  # bool (N,)
    accepted: np.ndarray      # bool (N,); True on real rows

    def __len__(self) -> int:
        return len(self.images)

    def where(self, mask: np.ndarray) -> Rows:
        mask = np.asarray(mask)
        return Rows(self.images[mask], self.labels[mask], self.patient_id[mask], self.stage[mask],
                    self.is_synthetic[mask], self.accepted[mask])

    def of_patients(self, patients: Iterable[str]) -> Rows:
        return self.where(np.isin(self.patient_id, list(patients)))

    @property
    def patients(self) -> list[str]:
        return sorted(set(self.patient_id.tolist()))

    @staticmethod
    def concat(*parts: Rows) -> Rows:
        parts = [p for p in parts if len(p)] or list(parts[:1])
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("images", "labels", "patient_id", "stage", "is_synthetic", "accepted")))

    @staticmethod
    def from_frame(images: np.ndarray, labels: np.ndarray, meta: pd.DataFrame) -> Rows:
        n = len(meta)
        syn = meta["is_synthetic"].to_numpy(bool) if "is_synthetic" in meta else np.zeros(n, bool)
        acc = meta["accepted"].to_numpy(bool) if "accepted" in meta else np.ones(n, bool)
        return Rows(np.asarray(images, np.uint8), np.asarray(labels, np.uint8),
                    meta["patient_id"].astype(str).to_numpy(), meta["stage"].to_numpy(np.int64), syn, acc | ~syn)


@dataclass(frozen=True)
class StudyData:
    """Everything one protocol run reads: real rows per split, and the run's synthetic train rows."""

    real: dict[str, Rows]   # 'train', 'val', 'test'
    synthetic_train: Rows   # the run's synthetic rows of train patients (all; the filter is applied later)
    soul_h5: Path | None = None  # real rows on disk: what a subset maker cuts its sub-run from


def load_study_data(augmented_h5: str | Path, soul_h5: str | Path | None = None) -> StudyData:
    """Real rows by split and the synthetic rows of train patients, from an augmented file."""
    meta = read_meta(augmented_h5)
    images, labels = read_arrays(augmented_h5)
    rows = Rows.from_frame(images, labels, meta)
    split = meta["split"].to_numpy()
    real = {s: rows.where(~rows.is_synthetic & (split == s)) for s in ("train", "val", "test")}
    return StudyData(real=real, synthetic_train=rows.where(rows.is_synthetic & (split == "train")),
                     soul_h5=Path(soul_h5) if soul_h5 else None)


def filter_synthetic(rows: Rows, how: str) -> Rows:
    """The synthetic rows a mix starts from: the accepted ones (``accepted``, and ``agreement`` before its
    own selection, :func:`select_by_agreement`) or all of them."""
    return rows if how == "all" else rows.where(rows.accepted)


@dataclass(frozen=True)
class Relabeller:
    """The supervised segmenter trained on an arm's real rows (weights and threshold chosen on the validation
    patients): it relabels synthetic rows (``synthetic_labels="segmenter"``) and judges their labels
    (``synthetic_filter="agreement"``). It saw exactly the patients the arm's own labeller saw."""

    net: Any
    threshold: float

    def labels(self, images: np.ndarray) -> np.ndarray:
        from brvo_models.segmenter import predict_probabilities

        if len(images) == 0:
            return np.zeros(np.shape(images), np.uint8)
        return (predict_probabilities(self.net, images) > self.threshold).astype(np.uint8)


def fit_relabeller(real: Rows, val: Rows, config: UsefulnessConfig, seed: int, device: str = "auto") -> Relabeller:
    """The frozen segmenter recipe trained on ``real``'s real rows (synthetic ones are dropped)."""
    fitted = fit_recipe(real.where(~real.is_synthetic), val, config, seed, device)
    return Relabeller(fitted.net, float(fitted.threshold))


def select_by_agreement(rows: Rows, relabeller: Relabeller, val: Rows,
                        quantile: float = AGREEMENT_QUANTILE) -> tuple[Rows, dict[str, float]]:
    """Keep the synthetic rows whose label agrees with an independent labeller's as well as labellers agree
    on real images.

    Why: a synthetic row can be wrong in its image (off the real distribution) or in its label; both show as
    disagreement between two labellers trained apart. The bar comes from the data, not a constant: tau = the
    ``quantile`` of the per-row Dice between the relabeller's labels and the annotations on the real validation
    rows. A row is kept when Dice(its label, the relabeller's label) >= tau; it keeps its own label.
    Returns (kept rows, {tau, kept, of}).
    """
    from brvo_models.metrics import batch_dice

    if len(val) == 0:
        raise ValueError("synthetic_filter='agreement' needs real validation rows to set its bar")
    tau = float(np.quantile(batch_dice(relabeller.labels(val.images), val.labels), quantile))
    if len(rows) == 0:
        return rows, {"tau": round(tau, 4), "kept": 0, "of": 0}
    agreement = batch_dice(rows.labels, relabeller.labels(rows.images))
    keep = agreement >= tau
    return rows.where(keep), {"tau": round(tau, 4), "kept": int(keep.sum()), "of": len(rows)}


def with_labels(rows: Rows, labels: np.ndarray) -> Rows:
    """The same rows with other labels (e.g. the supervised segmenter's instead of Pix2Pix's)."""
    return Rows(rows.images, np.asarray(labels, np.uint8), rows.patient_id, rows.stage, rows.is_synthetic,
                rows.accepted)


# ------------------------------------------------------------------------- low-data subsets


def subset_patients(train_patients: Iterable[str], fraction: float, seed: int) -> list[str]:
    """``fraction`` of the train patients (at least 2), drawn by ``seed``; nested across fractions
    for one seed (the 25 % subset lies inside the 50 % one)."""
    pool = sorted(set(train_patients))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng([int(seed), 0x5EB5E7]).permutation(len(pool))
    n = min(len(pool), max(2, int(round(fraction * len(pool)))))
    return sorted(pool[i] for i in order[:n])


@dataclass(frozen=True)
class SubsetRequest:
    """Make synthetic rows for ``train_patients``' missing stages from models trained on them alone."""

    soul_h5: Path                       # the run's real rows; only the patients below may be read from it
    train_patients: tuple[str, ...]     # the subset: the only patients the generator and labeller train on
    selection_patients: tuple[str, ...]  # validation patients: checkpoint / threshold selection only
    seed: int
    work_dir: Path

    def key(self) -> str:
        blob = json.dumps({"train": list(self.train_patients), "select": list(self.selection_patients),
                           "seed": self.seed, "soul": str(self.soul_h5)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SyntheticMaker(Protocol):
    def __call__(self, request: SubsetRequest) -> Rows: ...


# --------------------------------------------------------------------------------- the tasks


def density(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, np.float64).reshape(len(labels), -1).mean(axis=1)


def response_pairs(rows: Rows, synthetic_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Every (visit row at stage a, later stage b of the same patient): the input row, a, b, the
    change from the row's own vessel density to the patient's mean density at b, and a weight
    (``synthetic_weight`` when the row or stage b is synthetic, else 1)."""
    dens = density(rows.labels)
    frame = pd.DataFrame({"p": rows.patient_id, "s": rows.stage, "d": dens, "syn": rows.is_synthetic})
    stage_density = frame.groupby(["p", "s"])["d"].mean().to_dict()
    stage_synthetic = frame.groupby(["p", "s"])["syn"].all().to_dict()
    out: dict[str, list] = {"row": [], "a": [], "b": [], "change": [], "weight": []}
    for i, (p, a) in enumerate(zip(rows.patient_id, rows.stage)):
        for b in range(int(a) + 1, len(STAGE_NAMES)):
            if (p, b) not in stage_density:
                continue
            out["row"].append(i)
            out["a"].append(int(a))
            out["b"].append(b)
            out["change"].append(stage_density[(p, b)] - dens[i])
            syn = bool(rows.is_synthetic[i]) or bool(stage_synthetic[(p, b)])
            out["weight"].append(synthetic_weight if syn else 1.0)
    return {"row": np.asarray(out["row"], np.int64), "a": np.asarray(out["a"], np.int64),
            "b": np.asarray(out["b"], np.int64), "change": np.asarray(out["change"], np.float64),
            "weight": np.asarray(out["weight"], np.float64)}


def _weights(rows: Rows, synthetic_weight: float) -> np.ndarray:
    return np.where(rows.is_synthetic, synthetic_weight, 1.0)


def fit_recipe(train: Rows, val: Rows, config: UsefulnessConfig, seed: int, device: str = "auto",
               weights: np.ndarray | None = None):
    """The project's supervised segmenter (brvo_models.segmenter) trained with the protocol's frozen
    recipe on ``train``; the validation patients' real rows choose its kept weights and threshold."""
    from brvo_models.segmenter import fit_segmenter

    r = config.segmenter
    return fit_segmenter(train.images, train.labels, image_size=train.images.shape[-1], steps=r.steps,
                         val_images=val.images, val_labels=val.labels,
                         val_every=max(1, r.steps // r.validations), arch=r.arch, width=r.width,
                         batch_size=r.batch_size, lr=r.lr, seed=seed, device=device, row_weights=weights,
                         crop=r.crop)


def run_segmentation(train: Rows, val: Rows, evaluate: Rows, config: UsefulnessConfig, seed: int,
                     device: str = "auto") -> dict[str, float]:
    """Train the frozen segmenter on ``train`` (synthetic rows weighted by ``synthetic_weight``), weights
    and threshold chosen on ``val`` (real rows); Dice and clDice on ``evaluate``'s real rows."""
    from brvo_models.segmenter import evaluate_segmenter

    weights = _weights(train, config.synthetic_weight) if train.is_synthetic.any() else None
    fitted = fit_recipe(train, val, config, seed, device, weights)
    scores = evaluate_segmenter(fitted.net, evaluate.images, evaluate.labels)
    return {"dice": scores["dice"], "cldice": scores["cldice"], "threshold": fitted.threshold,
            "best_step": float(fitted.best_step)}


def run_segmentation_seeds(trains: list[Rows], val: Rows, evaluate: Rows, config: UsefulnessConfig,
                           seeds: list[int], device: str = "auto") -> list[dict[str, float]]:
    """:func:`run_segmentation` for every seed of one arm at once (``trains[i]`` trained with ``seeds[i]``),
    the seeds' segmenters trained as one grouped net (brvo_models.segmenter.fit_segmenter_seeds): the same
    per-seed results within float rounding, at about the cost of one. A seed with no rows gets a NaN Dice."""
    from brvo_models.segmenter import evaluate_segmenter, fit_segmenter_seeds

    if len(trains) != len(seeds):
        raise ValueError(f"one train set per seed: {len(trains)} train sets, {len(seeds)} seeds")
    out: list[dict[str, float]] = [{"dice": float("nan")} for _ in seeds]
    used = [i for i, rows in enumerate(trains) if len(rows)]
    if not used:
        return out
    r = config.segmenter
    fits = fit_segmenter_seeds(
        [trains[i].images for i in used], [trains[i].labels for i in used], seeds=[seeds[i] for i in used],
        image_size=trains[used[0]].images.shape[-1], steps=r.steps, val_images=val.images, val_labels=val.labels,
        val_every=max(1, r.steps // r.validations), arch=r.arch, width=r.width, batch_size=r.batch_size, lr=r.lr,
        device=device, crop=r.crop, precision=r.precision,
        row_weights=[_weights(trains[i], config.synthetic_weight) if trains[i].is_synthetic.any() else None
                     for i in used])
    for i, fitted in zip(used, fits):
        scores = evaluate_segmenter(fitted.net, evaluate.images, evaluate.labels)
        out[i] = {"dice": scores["dice"], "cldice": scores["cldice"], "threshold": fitted.threshold,
                  "best_step": float(fitted.best_step)}
    return out


def run_response(train: Rows, evaluate: Rows, config: UsefulnessConfig, seed: int) -> dict[str, float]:
    """Train the frozen forecaster on ``train``'s pairs; mean absolute error of the later-stage
    density on ``evaluate``'s real pairs (and the correlation of predicted with true change)."""
    from brvo_models.response import forecast_change, train_forecaster

    recipe = config.forecaster
    pairs = response_pairs(train, config.synthetic_weight)
    test = response_pairs(evaluate)
    if len(pairs["row"]) == 0 or len(test["row"]) == 0:  # no patient with two stages: nothing to forecast
        return {"mae": float("nan"), "corr": float("nan"), "n_train_pairs": int(len(pairs["row"])),
                "n_eval_pairs": int(len(test["row"]))}
    net = train_forecaster(train.images[pairs["row"]], train.labels[pairs["row"]], pairs["a"], pairs["b"],
                           pairs["change"], pairs["weight"], recipe, seed)
    pred = forecast_change(net, evaluate.images[test["row"]], evaluate.labels[test["row"]], test["a"], test["b"],
                           recipe)
    err = np.abs(pred - test["change"])
    corr = float(np.corrcoef(pred, test["change"])[0, 1]) if len(err) > 2 and np.std(pred) > 0 else float("nan")
    return {"mae": float(err.mean()), "corr": corr, "n_train_pairs": int(len(pairs["row"])),
            "n_eval_pairs": int(len(err))}


def response_references(train: Rows, evaluate: Rows) -> dict[str, float]:
    """Forecasts that need no model, on the same evaluation pairs: 'no change' and the train rows'
    mean change per (a, b): a competent forecaster beats both."""
    tr, ev = response_pairs(train), response_pairs(evaluate)
    if len(tr["change"]) == 0 or len(ev["change"]) == 0:
        return {"no_change_mae": float("nan"), "stage_mean_mae": float("nan"), "n_eval_pairs": int(len(ev["change"]))}
    mean_change = pd.Series(tr["change"]).groupby([tr["a"], tr["b"]]).mean().to_dict()
    fallback = float(tr["change"].mean()) if len(tr["change"]) else 0.0
    per_gap = np.array([mean_change.get((a, b), fallback) for a, b in zip(ev["a"], ev["b"])])
    return {"no_change_mae": float(np.abs(ev["change"]).mean()),
            "stage_mean_mae": float(np.abs(ev["change"] - per_gap).mean()), "n_eval_pairs": len(ev["change"])}


# ------------------------------------------------------------------------------- statistics


def paired_verdict(baseline: list[float], arm: list[float], higher_is_better: bool) -> dict[str, Any]:
    """The declared rule (:data:`RULE`) on per-seed values of two arms, paired by position (seed)."""
    a, b = np.asarray(baseline, np.float64), np.asarray(arm, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired comparison needs equal, non-empty per-seed lists ({a.size} vs {b.size})")
    gains = (b - a) if higher_is_better else (a - b)
    n = gains.size
    mean = float(gains.mean())
    se = float(gains.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    t_crit = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) if n > 1 else float("nan")
    if n < 2 or not np.isfinite(se) or not np.isfinite(mean):  # no SE: neither a difference nor its absence
        verdict = NOT_ENOUGH_SEEDS
    elif se == 0.0:
        verdict = "gain" if mean > 0 else "loss" if mean < 0 else NO_DIFFERENCE
    elif mean > t_crit * se:
        verdict = "gain"
    elif mean < -t_crit * se:
        verdict = "loss"
    else:
        verdict = NO_DIFFERENCE
    return {"per_seed_gain": gains.tolist(), "mean_gain": mean, "se": se, "t_crit": t_crit, "n": n,
            "verdict": verdict}


def _summary(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "per_seed": v.tolist()}


# ------------------------------------------------------------------------- the learning-curve gate


def _share(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def low_data_tag(fraction: float) -> str:
    return f"low_data_{int(round(fraction * 100))}"


def gate_sizes(config: UsefulnessConfig) -> dict[str, float]:
    """Per group of arms that add data, the train fraction whose real-only run the full split must beat:
    half the split for the full-data arms (their own size is the split), the arm's fraction otherwise."""
    groups = {FULL_DATA: 0.5} if any(a != "real_only" for a in config.arms) else {}
    return {**groups, **{low_data_tag(f): float(f) for f in config.low_data_fractions}}


def curve_fractions(groups: dict[str, float], extra: Iterable[float] = ()) -> list[float]:
    """The real-only curve's sizes: each gated size, twice it (capped at the split), the full split, and ``extra``."""
    points = {1.0, *(float(f) for f in extra)}
    for f in groups.values():
        points |= {f, min(2 * f, 1.0)}
    bad = [f for f in points if not 0 < f <= 1]
    if bad:
        raise ValueError(f"learning-curve sizes must lie in (0, 1], got {sorted(bad)}")
    return sorted(points)


def real_only_at(train: Rows, fraction: float, seed: int, subset_models: str) -> Rows:
    """Real-only train rows at ``fraction`` of the train patients: the same draw as the low-data arm of that size."""
    if fraction >= 1.0:
        return train
    return train.of_patients(subset_patients(train.patients, fraction, 0 if subset_models == "shared" else seed))


class RealOnlyStore:
    """Real-only results by the key of their own inputs, one JSON file per train fraction under ``directory``.

    Why: real-only at the full split and at the gate's sizes depends on the real rows, the protocol's config,
    the device and the code, never on the generator. A run whose CRGAN (or Pix2Pix) is retrained on the same
    data would otherwise train those segmenters and forecasters again: about two thirds of the step's work on
    the demo. The key hashes the real rows' bytes (train, val and the evaluation split), the whole usefulness
    config, the device and the code of this module's closure, so an entry is only what the current code would
    compute."""

    def __init__(self, directory: str | Path, data: StudyData, config: UsefulnessConfig, device: str,
                 log: Callable[[str], None] = print) -> None:
        from tasks.engine.identity import code_fingerprint

        self.directory, self.log = Path(directory), log
        h = hashlib.sha256()
        for split in ("train", "val", config.eval_split):
            rows = data.real[split]
            for part in (rows.images, rows.labels, rows.patient_id.astype(str), rows.stage):
                h.update(np.ascontiguousarray(part).tobytes())
        h.update(json.dumps({"usefulness": config.model_dump(mode="json"), "device": device}, sort_keys=True).encode())
        h.update(code_fingerprint(real_only_point).encode())
        self.prefix = h.hexdigest()

    def _path(self, fraction: float) -> tuple[Path, str]:
        key = hashlib.sha256(f"{self.prefix}|{fraction!r}".encode()).hexdigest()
        return self.directory / f"{key}.json", key

    def load(self, fraction: float) -> dict[str, Any] | None:
        from tasks.shared.keyed_cache import read_entry

        path, key = self._path(fraction)
        entry = read_entry(path, key, self.log, "usefulness: real-only")
        if entry is None:
            return None
        self.log(f"usefulness: real-only at {_share(fraction)} of the train patients served from {path}")
        return entry["result"]

    def save(self, fraction: float, point: dict[str, Any]) -> None:
        from tasks.shared.keyed_cache import write_entry

        write_entry(*self._path(fraction), point)


def real_only_point(train: Rows, val: Rows, evaluate: Rows, config: UsefulnessConfig, fraction: float, *,
                    device: str = "auto", store: RealOnlyStore | None = None) -> dict[str, Any]:
    """Real-only rows at ``fraction`` of the train patients (the low-data arm's draw), every seed and task:
    {'patients': [per seed], 'tasks': {task: [the task's outputs per seed]}}; from ``store`` when it has them."""
    if store is not None:
        hit = store.load(fraction)
        if hit is not None:
            return hit
    seeds = list(range(config.seeds))
    rows = [real_only_at(train, fraction, s, config.subset_models) for s in seeds]
    point: dict[str, Any] = {"patients": [len(r.patients) for r in rows], "tasks": {}}
    for t in config.tasks:
        if t == "segmentation":
            point["tasks"][t] = run_segmentation_seeds(rows, val, evaluate, config, seeds, device)
        else:
            point["tasks"][t] = [run_response(r, evaluate, config, s) for r, s in zip(rows, seeds)]
    if store is not None:
        store.save(fraction, point)
    return point


def measure_curve(train: Rows, val: Rows, evaluate: Rows, config: UsefulnessConfig, fractions: Iterable[float], *,
                  known: dict[float, dict[str, Any]] | None = None, device: str = "auto",
                  log: Callable[[str], None] = print, store: RealOnlyStore | None = None
                  ) -> dict[float, dict[str, Any]]:
    """Real-only per seed at each fraction: {fraction: {'patients': [...], task: [primary metric per seed]}}.
    ``known`` holds sizes an arm already measured (the same rows, recipe and seeds), reused as they are;
    ``store`` serves and keeps the rest by their inputs."""
    curve = dict(known or {})
    for f in fractions:
        if f in curve:
            continue
        point = real_only_point(train, val, evaluate, config, f, device=device, store=store)
        curve[f] = {"patients": point["patients"],
                    **{t: [float(out[PRIMARY[t][0]]) for out in point["tasks"][t]] for t in config.tasks}}
        for seed, n in enumerate(point["patients"]):
            log(f"usefulness: seed {seed} real-only at {_share(f)} of the train patients ({n}): "
                + "; ".join(f"{t} {PRIMARY[t][0]} {curve[f][t][seed]:.6f}" for t in config.tasks))
    return curve


def judge_gate(curve: dict[float, dict[str, Any]], groups: dict[str, float], tasks: Iterable[str]) -> dict[str, Any]:
    """The gate's verdicts from a measured curve (:data:`GATE_RULE`): the curve per task with each size's
    paired gain of the full split over it, per group and task whether its arms are measurable, and where
    real-only stops improving."""
    full = curve[1.0]
    out: dict[str, Any] = {"rule": GATE_RULE, "curve": {}, "groups": {}, "stops_improving": {}}
    for t in tasks:
        metric, higher = PRIMARY[t]
        points = []
        for f in sorted(curve):
            v = np.asarray(curve[f][t], np.float64)
            n = v.size
            sd = float(v.std(ddof=1)) if n > 1 else float("nan")
            point = {"fraction": f, "patients": float(np.mean(curve[f]["patients"])), "metric": metric,
                     "mean": float(v.mean()), "sd": sd, "se": sd / np.sqrt(n) if n > 1 else float("nan"),
                     "per_seed": v.tolist()}
            if f < 1.0:
                point["full_split_vs_this"] = paired_verdict(curve[f][t], full[t], higher)
            points.append(point)
        out["curve"][t] = points
        out["stops_improving"][t] = _stops_improving(points)
    for group, f in groups.items():
        entry: dict[str, Any] = {"fraction": 1.0 if group == FULL_DATA else f, "compared_fraction": f, "tasks": {}}
        for t in tasks:
            point = next(p for p in out["curve"][t] if p["fraction"] == f)
            cmp = point["full_split_vs_this"]
            n_small, n_full = point["patients"], out["curve"][t][-1]["patients"]
            if cmp["verdict"] == NOT_ENOUGH_SEEDS:
                measurable, reason = None, (f"{NOT_ENOUGH_SEEDS}: the real-only curve has {cmp['n']} seed(s) "
                                            "or a missing value, so its SE is undefined")
            elif cmp["verdict"] == "gain":
                measurable, reason = True, (f"real-only still improves: the full split ({n_full:.0f} patients) beats "
                                            f"{n_small:.0f} patients by {_num(cmp['mean_gain'], '+.4f')} "
                                            f"(SE {_num(cmp['se'], '.4f')})")
            else:
                measurable, reason = False, (f"real-only is saturated at {n_small:.0f} patients: the full split "
                                             f"({n_full:.0f} patients) is not better by the rule "
                                             f"({_num(cmp['mean_gain'], '+.4f')}, SE {_num(cmp['se'], '.4f')})")
            entry["tasks"][t] = {"measurable": measurable, "reason": reason, "patients": n_small,
                                 "full_split_patients": n_full, **{k: cmp[k] for k in ("mean_gain", "se", "verdict")}}
        out["groups"][group] = entry
    return out


def _stops_improving(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The smallest size from which on the full split beats no size below it by the rule."""
    below = [p for p in points if p["fraction"] < 1.0]
    if not below:
        return {"patients": None, "text": "no size below the full split was measured"}
    if any(p["full_split_vs_this"]["verdict"] == NOT_ENOUGH_SEEDS for p in below):
        return {"patients": None, "text": NOT_ENOUGH_SEEDS}
    flat = None
    for p in reversed(below):
        if p["full_split_vs_this"]["verdict"] == "gain":
            break
        flat = p
    if flat is None:
        return {"patients": None, "text": f"still improving at the full split ({points[-1]['patients']:.0f} patients)"}
    where = "at or below" if flat is below[0] else "at"  # the curve says nothing about sizes it did not measure
    return {"patients": flat["patients"], "fraction": flat["fraction"],
            "text": f"stops improving {where} {flat['patients']:.0f} patients ({_share(flat['fraction'])} of the train "
                    "split" + (", the smallest size measured)" if flat is below[0] else ")")}


def gated(comparison: dict[str, Any], gate_task: dict[str, Any] | None) -> dict[str, Any]:
    """A comparison whose arm adds data, with the gate's say on it: ``rule_verdict`` is the paired rule's own,
    ``verdict`` what may be claimed (the rule's where the arm is measurable, else 'not measurable here: ...' or
    'not enough seeds'). ``gate_task`` is the gate's entry for the arm's group and task (None: no gate applies)."""
    out = {**comparison, "rule_verdict": comparison["verdict"], "gate": gate_task}
    if comparison["verdict"] == NOT_ENOUGH_SEEDS or gate_task is None or gate_task["measurable"]:
        return out
    if gate_task["measurable"] is None:
        return {**out, "verdict": NOT_ENOUGH_SEEDS}
    return {**out, "verdict": f"{NOT_MEASURABLE}: real-only is saturated at {gate_task['patients']:.0f} patients"}


def run_gate(data: StudyData, config: UsefulnessConfig, *, extra_fractions: Iterable[float] = (),
             device: str = "auto", log: Callable[[str], None] = print) -> dict[str, Any]:
    """The learning-curve gate alone, on real rows only (what the arms of ``config`` would be gated by)."""
    groups = gate_sizes(config)
    fractions = curve_fractions(groups, extra_fractions)
    curve = measure_curve(data.real["train"], data.real["val"], data.real[config.eval_split], config, fractions,
                          device=device, log=log)
    return judge_gate(curve, groups, config.tasks)


# ---------------------------------------------------------------------------------- protocol


@dataclass
class _Arm:
    name: str
    rows_for_seed: Callable[[int], Rows]
    baseline: str | None = None  # the arm it is compared with
    meta: dict[str, Any] = field(default_factory=dict)
    real_fraction: float | None = None  # real rows alone at this train fraction (a point of the real-only curve)


def low_data_infeasible(train_patients: Iterable[str], selection_patients: Iterable[str]) -> str | None:
    """Why a low-data arm cannot run on this split, or None. Its sub-run trains Pix2Pix and CRGAN on the subset
    and needs two validation patients (one selects checkpoints, one is the training preflight's test), and a
    subset smaller than the train patients (else it is the full-data arm again)."""
    n_train, n_select = len(set(train_patients)), len(set(selection_patients))
    if n_select < 2:
        return (f"only {n_select} validation patient(s); a low-data sub-run needs 2 (one selects its checkpoints, "
                "one is its preflight's test patient)")
    if n_train <= 2:
        return f"only {n_train} train patient(s); a low-data subset keeps at least 2, so it would not be smaller"
    return None


def _arms(data: StudyData, config: UsefulnessConfig, maker: SyntheticMaker | None, work_dir: Path,
          maker_seconds: dict[str, dict[str, float]], device: str, skipped: dict[str, str],
          selection: dict[str, dict[str, float]]) -> list[_Arm]:
    real_train, val = data.real["train"], data.real["val"]

    def mixed(rows: Rows, real: Rows, seed: int, tag: str) -> Rows:
        """The mix's synthetic rows: filtered (config.synthetic_filter), then labelled (config.synthetic_labels)."""
        rows = filter_synthetic(rows, config.synthetic_filter)
        needs_relabeller = len(rows) > 0 and (config.synthetic_filter == "agreement"
                                              or config.synthetic_labels == "segmenter")
        if not needs_relabeller:
            return rows
        relabeller = fit_relabeller(real, val, config, seed, device)
        if config.synthetic_filter == "agreement":
            rows, selection[tag] = select_by_agreement(rows, relabeller, val)
        if config.synthetic_labels == "segmenter":
            rows = with_labels(rows, relabeller.labels(rows.images))
        return rows

    full_data = [a for a in config.arms if a != "real_only"]
    syn = mixed(data.synthetic_train, real_train, 0, "full_data") if full_data else data.synthetic_train
    arms: list[_Arm] = []
    if config.arms:  # the full-data arms are compared with real_only, so it runs whenever any of them does
        arms.append(_Arm("real_only", lambda s: real_train, real_fraction=1.0))
    if "real_plus_synthetic" in config.arms:
        arms.append(_Arm("real_plus_synthetic", lambda s: Rows.concat(real_train, syn), "real_only",
                         {"group": FULL_DATA, "adds_synthetic": True}))
    if "synthetic_only" in config.arms:
        arms.append(_Arm("synthetic_only", lambda s: syn, "real_only", {"group": FULL_DATA, "adds_synthetic": False}))
    made: dict[tuple[float, int], Rows] = {}
    train_ids, select_ids = real_train.patients, data.real["val"].patients

    def subset_seed(seed: int) -> int:
        return 0 if config.subset_models == "shared" else seed

    def synthetic_for(fraction: float, seed: int) -> Rows:
        key = (fraction, subset_seed(seed))
        if key not in made:
            if maker is None or data.soul_h5 is None:
                raise ValueError("low-data arms need a synthetic-row maker and the run's soul.h5")
            ids = subset_patients(train_ids, fraction, key[1])
            request = SubsetRequest(soul_h5=data.soul_h5, train_patients=tuple(ids),
                                    selection_patients=tuple(select_ids), seed=key[1],
                                    work_dir=work_dir / f"subset_{fraction:g}_seed{key[1]}")
            w0, c0 = time.perf_counter(), time.process_time()
            rows = maker(request)
            maker_seconds[request.work_dir.name] = {"wall_s": round(time.perf_counter() - w0, 1),
                                                    "cpu_s": round(time.process_time() - c0, 1)}
            outside = sorted(set(rows.patient_id.tolist()) - set(ids))
            if outside:
                raise ValueError(f"synthetic-row maker returned rows of patients outside the subset: {outside[:5]}")
            subset_real = real_train.of_patients(ids)
            made[key] = mixed(rows.where(rows.is_synthetic), subset_real, key[1], request.work_dir.name)
        return made[key]

    infeasible = low_data_infeasible(train_ids, select_ids) if config.low_data_fractions else None
    for f in config.low_data_fractions:
        tag = low_data_tag(f)
        if infeasible:
            skipped[tag] = infeasible
            continue
        real_sub = lambda s, f=f: real_only_at(real_train, f, s, config.subset_models)
        arms.append(_Arm(f"{tag}_real", real_sub, None, {"fraction": f}, real_fraction=f))
        arms.append(_Arm(f"{tag}_real_plus_synthetic", lambda s, f=f, r=real_sub: Rows.concat(r(s), synthetic_for(f, s)),
                         f"{tag}_real", {"fraction": f, "group": tag, "adds_synthetic": True}))
    return arms


def run_protocol(data: StudyData, config: UsefulnessConfig, *, maker: SyntheticMaker | None = None,
                 work_dir: str | Path = ".", log: Callable[[str], None] = print, device: str = "auto",
                 real_only_cache: str | Path | None = None) -> dict[str, Any]:
    """Every arm x task x seed, then the paired comparisons; returns the plain result dict.
    ``real_only_cache``: a directory where the real-only arms and the gate's points are kept by their inputs
    (:class:`RealOnlyStore`), so a rerun with another generator trains only the mixes; None: all computed."""
    t0, c0 = time.perf_counter(), time.process_time()
    evaluate = data.real[config.eval_split]
    val = data.real["val"]
    maker_seconds: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    selection: dict[str, dict[str, float]] = {}
    arms = _arms(data, config, maker, Path(work_dir), maker_seconds, device, skipped, selection)
    for name, reason in skipped.items():
        log(f"usefulness: {name} arms skipped: {reason}")
    seeds = list(range(config.seeds))
    store = RealOnlyStore(real_only_cache, data, config, device, log) if real_only_cache is not None else None
    real_points = {a.name: real_only_point(data.real["train"], val, evaluate, config, a.real_fraction, device=device,
                                           store=store) for a in arms if a.real_fraction is not None}
    # an arm's seeds train as one grouped segmenter: the per-seed results of run_segmentation, within float rounding
    segmentation = {a.name: real_points[a.name]["tasks"]["segmentation"] if a.name in real_points
                    else run_segmentation_seeds([a.rows_for_seed(s) for s in seeds], val, evaluate, config, seeds,
                                                device) for a in arms} if "segmentation" in config.tasks else {}
    values: dict[str, dict[str, dict[str, list[float]]]] = {a.name: {t: {} for t in config.tasks} for a in arms}
    sizes: dict[str, dict[str, list[int]]] = {a.name: {"rows": [], "synthetic_rows": [], "patients": []} for a in arms}
    for seed in seeds:
        for arm in arms:
            rows = arm.rows_for_seed(seed)
            sizes[arm.name]["rows"].append(len(rows))
            sizes[arm.name]["synthetic_rows"].append(int(rows.is_synthetic.sum()))
            sizes[arm.name]["patients"].append(len(rows.patients))
            for task_name in config.tasks:
                if len(rows) == 0:  # e.g. synthetic_only when no synthetic row was accepted
                    out = {PRIMARY[task_name][0]: float("nan")}
                elif task_name == "segmentation":
                    out = segmentation[arm.name][seed]
                elif arm.name in real_points:
                    out = real_points[arm.name]["tasks"][task_name][seed]
                else:
                    out = run_response(rows, evaluate, config, seed)
                for k, v in out.items():
                    values[arm.name][task_name].setdefault(k, []).append(float(v))
            log(f"usefulness: seed {seed} {arm.name}: " + "; ".join(
                f"{t} {PRIMARY[t][0]} {values[arm.name][t][PRIMARY[t][0]][-1]:.4f}" for t in config.tasks))
    result_arms = {}
    for arm in arms:
        tasks = {t: {k: _summary(v) for k, v in values[arm.name][t].items()} for t in config.tasks}
        result_arms[arm.name] = {"n_rows": sizes[arm.name]["rows"], "n_synthetic_rows": sizes[arm.name]["synthetic_rows"],
                                 "n_patients": sizes[arm.name]["patients"], "tasks": tasks, **arm.meta}
    ran = {a.meta.get("group") for a in arms if a.meta.get("adds_synthetic")}
    groups = {g: f for g, f in gate_sizes(config).items() if g in ran}  # a skipped arm needs no gate
    known: dict[float, dict[str, Any]] = {}
    for name, fraction in [("real_only", 1.0), *((f"{low_data_tag(f)}_real", f) for f in config.low_data_fractions)]:
        if name in values:  # the same rows, recipe and seeds as the curve's point: measured once
            known[fraction] = {"patients": sizes[name]["patients"],
                               **{t: values[name][t][PRIMARY[t][0]] for t in config.tasks}}
    gate = judge_gate(measure_curve(data.real["train"], val, evaluate, config, curve_fractions(groups), known=known,
                                    device=device, log=log, store=store), groups, config.tasks) if groups else None
    comparisons = []
    for arm in arms:
        if arm.baseline is None:
            continue
        for t in config.tasks:
            metric, higher = PRIMARY[t]
            cmp = paired_verdict(values[arm.baseline][t][metric], values[arm.name][t][metric], higher)
            cmp = {"arm": arm.name, "baseline": arm.baseline, "baseline_role": "real_only", "task": t, "metric": metric,
                   "group": arm.meta.get("group"), "adds_synthetic": bool(arm.meta.get("adds_synthetic")), **cmp}
            # synthetic rows in place of real ones are not added data: the gate does not apply to them
            gate_task = gate["groups"][cmp["group"]]["tasks"][t] if gate and cmp["adds_synthetic"] else None
            comparisons.append(gated(cmp, gate_task))
    references = {"response": response_references(data.real["train"], evaluate)} if "response" in config.tasks else {}
    return {
        "rule": RULE,
        "alpha": ALPHA,
        "eval_split": config.eval_split,
        "seeds": seeds,
        "config": config.model_dump(mode="json"),
        "patients": {s: len(r.patients) for s, r in data.real.items()},
        "arms": result_arms,
        "comparisons": comparisons,
        "gate": gate,  # the learning-curve gate (GATE_RULE): real-only per size, and which arms are measurable
        "generators": generator_setting(config),
        "skipped_arms": skipped,  # arm prefix -> why it could not run on this split
        "agreement_selection": selection,  # synthetic_filter='agreement': per row source, its bar and rows kept
        "references": references,
        "synthetic_maker_seconds": maker_seconds,  # per low-data subset: its generator + labeller (0 when cached)
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
    }


def _num(value: Any, spec: str) -> str:
    """A number for a table; 'n/a' for a missing one (NaN is stored as null in a step record: one seed has no SE)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return format(value, spec)


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """One sentence per comparison, e.g. for a log or a report."""
    out = []
    for c in result["comparisons"]:
        base = result["arms"][c["baseline"]]["tasks"][c["task"]][c["metric"]]["mean"]
        arm = result["arms"][c["arm"]]["tasks"][c["task"]][c["metric"]]["mean"]
        out.append(f"{c['task']}: {c['arm']} vs {c['baseline']}: {c['metric']} {_num(base, '.4f')} -> "
                   f"{_num(arm, '.4f')}, paired gain {_num(c['mean_gain'], '+.4f')} (SE {_num(c['se'], '.4f')}, "
                   f"needs > {_num(c['t_crit'], '.2f')} SE): {c['verdict']}")
    return out


def gate_lines(result: dict[str, Any]) -> list[str]:
    """One sentence per gated group of arms and task (measurable or not, and why), and where real-only stops
    improving, e.g. for a log."""
    gate = result.get("gate") or {}
    out = [f"gate: {group} arms on {task}: "
           + {True: "measurable", False: "not measurable", None: NOT_ENOUGH_SEEDS}[g["measurable"]] + f" ({g['reason']})"
           for group, entry in (gate.get("groups") or {}).items() for task, g in entry["tasks"].items()]
    return out + [f"gate: real-only on {task} {s['text']}" for task, s in (gate.get("stops_improving") or {}).items()]


def render_markdown(result: dict[str, Any]) -> str:
    """The protocol's tables: every arm x task (mean +- sd over seeds), then every comparison's verdict."""
    tasks = list(next(iter(result["arms"].values()))["tasks"]) if result["arms"] else []
    cols = []
    for t in tasks:
        cols += [(t, "dice"), (t, "cldice")] if t == "segmentation" else [(t, "mae"), (t, "corr")]
    head = "| arm | rows (synthetic) | patients | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for name, arm in result["arms"].items():
        cells = []
        for t, m in cols:
            s = arm["tasks"][t].get(m)
            cells.append(f"{_num(s['mean'], '.4f')} +- {_num(s['sd'], '.4f')}" if s else "")
        rows = f"{_num(np.mean(arm['n_rows']), '.0f')} ({_num(np.mean(arm['n_synthetic_rows']), '.0f')})"
        lines.append(f"| {name} | {rows} | {_num(np.mean(arm['n_patients']), '.0f')} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | task | paired gain | SE | needs > | verdict |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['arm']} vs {c['baseline']} | {c['task']} ({c['metric']}) | {_num(c['mean_gain'], '+.4f')} | "
                     f"{_num(c['se'], '.4f')} | {_num(c['t_crit'], '.2f')} SE | **{c['verdict']}**"
                     + _rule_alone(c) + " |")
    lines += render_gate(result.get("gate"))
    ref = result.get("references", {}).get("response")
    notes = [f"Scored on the real rows of the {result['eval_split']} patients; seeds {result['seeds']}; mixes of "
             f"{mix_settings(result)}. Rule, declared before any number was seen: {result['rule']}."]
    if result.get("generators"):
        notes.append(f"Generators behind the verdicts: {result['generators']}.")
    status = rows_help_status(result)
    if status:
        notes.append(f"Bar synthetic_rows_help: **{status['status']}** ({status['reason']}).")
    cfg = result.get("config") or {}
    left_out = [a for a in ("real_plus_synthetic", "synthetic_only") if cfg and a not in cfg.get("arms", ())]
    if cfg and not cfg.get("low_data_fractions"):
        left_out.append("low-data arms")
    for name, reason in (result.get("skipped_arms") or {}).items():
        notes.append(f"**Skipped:** the {name} arms: {reason}.")
    for source, kept in (result.get("agreement_selection") or {}).items():
        notes.append(f"Agreement selection ({source}): kept {kept['kept']} of {kept['of']} synthetic rows "
                     f"(bar: Dice >= {kept['tau']:.3f}).")
    if left_out:
        notes.append(f"Not run here (budget): {', '.join(left_out)}; benchmarks/usefulness_study.py runs the full "
                     "study.")
    if ref:
        notes.append(f"Response forecast references on the same pairs: no change MAE "
                     f"{_num(ref['no_change_mae'], '.4f')}, train mean change per (a, b) MAE "
                     f"{_num(ref['stage_mean_mae'], '.4f')}.")
    return "\n".join(lines + [""] + notes)


def _rule_alone(c: dict[str, Any]) -> str:
    """Beside a verdict the gate withheld: a gain or loss the paired rule alone called (a loss stays visible; its
    absence is not restated, since a flat curve's verdict is never 'no difference')."""
    alone = c.get("rule_verdict")
    return f" (by the rule alone: {alone})" if alone in ("gain", "loss") and alone != c["verdict"] else ""


def render_gate(gate: dict[str, Any] | None) -> list[str]:
    """The learning-curve gate's tables: real-only per size and task, then which arms are measurable."""
    if not gate:
        return []
    lines = ["", "Learning-curve gate, real-only by train size (paired by seed; the full split's gain over each size):",
             "", "| task | share of train patients | patients | mean | SE | full split's gain (SE) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for task, points in gate["curve"].items():
        for p in points:
            vs = p.get("full_split_vs_this")
            lines.append(f"| {task} ({p['metric']}) | {_share(p['fraction'])} | {p['patients']:.0f} | "
                         f"{_num(p['mean'], '.4f')} | {_num(p['se'], '.4f')} | "
                         + (f"{_num(vs['mean_gain'], '+.4f')} ({_num(vs['se'], '.4f')}) | {vs['verdict']} |" if vs
                            else "(the full split) | |"))
    lines += ["", "| arms | task | measurable | why |", "|---|---|---|---|"]
    for group, entry in gate["groups"].items():
        for task, g in entry["tasks"].items():
            said = {True: "yes", False: "**no**", None: f"**{NOT_ENOUGH_SEEDS}**"}[g["measurable"]]
            lines.append(f"| {group} | {task} | {said} | {g['reason']} |")
    stops = "; ".join(f"{task}: {s['text']}" for task, s in (gate.get("stops_improving") or {}).items())
    lines += ["", f"Where real-only stops improving: {stops}. Gate rule, declared before any number: {gate['rule']}."]
    return lines


# ------------------------------------------------------------------------------ the pipeline step


def mix_comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparisons that ask the product's question: real + synthetic rows vs the same real rows alone
    (full data and every low-data fraction); synthetic_only vs real_only is context, not the promise."""
    return [c for c in result.get("comparisons", []) if adds_synthetic(c)]


def adds_synthetic(comparison: dict[str, Any]) -> bool:
    """Whether the comparison's arm adds synthetic rows to real ones (without the field: by its name, as the
    protocol's and the label-scarce study's arms are named)."""
    return bool(comparison.get("adds_synthetic", comparison["arm"].endswith(("plus_synthetic", "plus_both"))))


def rows_help_status(result: dict[str, Any]) -> dict[str, str] | None:
    """The quality bar 'synthetic rows help' (docs/usefulness.md, declared with the gate): {'status', 'reason'}.

    met: in an arm the gate calls measurable, a mix beats real-only and the same-information alternative by the
    rule on a task, and no measurable mix loses to real-only; 'not shown' when a measurable mix beats real-only
    but no alternative arm was run; 'not measurable' when no mix is measurable (or has enough seeds); else
    missed. None when no mix ran. Only 'met' counts as met."""
    mixes = [c for c in result.get("comparisons", []) if adds_synthetic(c)
             and c["metric"] == PRIMARY.get(c["task"], (c["metric"],))[0]]  # the task's primary metric decides
    if not mixes:
        return None
    role = lambda c: c.get("baseline_role", "real_only")  # noqa: E731
    measurable = [c for c in mixes if (c.get("gate") or {}).get("measurable") and c["verdict"] != NOT_ENOUGH_SEEDS]
    if not measurable:
        if all(c["verdict"] == NOT_ENOUGH_SEEDS for c in mixes):
            return {"status": "not measurable", "reason": f"{NOT_ENOUGH_SEEDS}: a verdict needs at least 2 seeds "
                                                          f"with defined values ({len(result.get('seeds') or [])} run)"}
        why = sorted({f"{c.get('group') or c['arm']} on {c['task']}: "
                      + ((c.get("gate") or {}).get("reason") or "no learning-curve gate was run") for c in mixes})
        return {"status": "not measurable", "reason": "no mix is in an arm the learning-curve gate calls measurable ("
                                                      + "; ".join(why) + ")"}
    losses = [c for c in measurable if role(c) == "real_only" and c["verdict"] == "loss"]
    if losses:
        return {"status": "missed", "reason": "a measurable mix loses to real-only: " + "; ".join(
            f"{c['arm']} on {c['task']} ({c['metric']} {_num(c['mean_gain'], '+.4f')}, SE {_num(c['se'], '.4f')})"
            for c in losses)}
    beats_real = [c for c in measurable if role(c) == "real_only" and c["verdict"] == "gain"]
    if not beats_real:
        return {"status": "missed", "reason": "no measurable mix beats real-only by the rule"}
    for c in beats_real:
        rivals = [a for a in measurable if role(a) == "same_information_alternative" and a["arm"] == c["arm"]
                  and a["task"] == c["task"]]
        if any(a["verdict"] == "gain" for a in rivals):
            return {"status": "met", "reason": f"{c['arm']} on {c['task']} beats real-only and the same-information "
                                               "alternative by the rule, and no measurable mix loses"}
    if any(a for a in mixes if role(a) == "same_information_alternative"):
        return {"status": "missed", "reason": "a measurable mix beats real-only but not the same-information "
                                              "alternative by the rule"}
    return {"status": "not shown", "reason": "no same-information alternative was run: "
            + "; ".join(f"{c['arm']} on {c['task']} beats real-only by the rule" for c in beats_real)}


def rows_help(result: dict[str, Any]) -> bool | None:
    """The bar as a quality-bar boolean: True only when :func:`rows_help_status` says met; None when no mix ran."""
    status = rows_help_status(result)
    return None if status is None else status["status"] == "met"


def generator_setting(config: UsefulnessConfig) -> str:
    """Which trained generators the verdicts rest on (what the seeds vary)."""
    full = ("the full-data mixes use the run's one trained Pix2Pix and CRGAN (the seeds vary the downstream "
            "training)") if any(a != "real_only" for a in config.arms) else ""
    low = ""
    if config.low_data_fractions:
        low = ("the low-data arms train their own Pix2Pix and CRGAN per seed, each seed on its own patient subset "
               "(subset_models: per_seed)" if config.subset_models == "per_seed" else
               "the low-data arms share one subset and one trained Pix2Pix and CRGAN across seeds (subset_models: "
               "shared; the seeds vary the downstream training only)")
    return "; ".join(p for p in (full, low) if p) or "no mix with synthetic rows"


def usefulness_warnings(result: dict[str, Any]) -> list[str]:
    """WARNING lines: every gated arm that is not measurable (and why), and the bar when it cannot be called."""
    out = []
    gate = result.get("gate") or {}
    for group, entry in (gate.get("groups") or {}).items():
        for task, g in (entry.get("tasks") or {}).items():
            if not g.get("measurable"):
                out.append(f"usefulness: the {group} arms on {task} are not measurable: {g['reason']}")
    if any(adds_synthetic(c) and not c.get("gate") for c in result.get("comparisons") or []):
        out.append("usefulness: a mix was compared without the learning-curve gate (a result made before it), so "
                   "its verdict on added data is not gated")
    status = rows_help_status(result)
    if status and status["status"] in ("not measurable", "not shown"):
        out.append(f"usefulness: synthetic_rows_help {status['status']}: {status['reason']}")
    return out


def mix_settings(result: dict[str, Any]) -> str:
    """How the synthetic rows entered the mixes (what a consumer must copy to get the measured effect)."""
    cfg = result.get("config") or {}
    labels = {"pipeline": "their Pix2Pix labels", "segmenter": "relabelled by a supervised segmenter trained on "
              "the same real rows"}.get(cfg.get("synthetic_labels", "pipeline"), cfg.get("synthetic_labels"))
    rows = {"accepted": "accepted synthetic rows", "all": "all synthetic rows",
            "agreement": "accepted synthetic rows whose label agrees with a supervised segmenter's trained on the same "
                         f"real rows (at least its {AGREEMENT_QUANTILE:.0%}-quantile Dice with the annotations on "
                         "validation rows)"}.get(cfg.get("synthetic_filter", "accepted"), cfg.get("synthetic_filter"))
    return f"{rows}, {labels}, loss weight {cfg.get('synthetic_weight', 1.0):g} per synthetic row"


def usage_advice(result: dict[str, Any]) -> str:
    """One paragraph for the dataset card: which mix helped, by how much, with which settings, or that none did."""
    mixes = mix_comparisons(result)
    if not mixes:
        return "No real + synthetic mix was measured in this run."
    helped = [c for c in mixes if c["verdict"] == "gain"]
    hurt = [c for c in mixes if c["verdict"] == "loss"]
    unmeasurable = [c for c in mixes if c["verdict"].startswith(NOT_MEASURABLE)]
    too_few = [c for c in mixes if c["verdict"] == NOT_ENOUGH_SEEDS]

    def say(c: dict[str, Any]) -> str:
        return f"{c['arm']} on {c['task']} ({c['metric']} {_num(c['mean_gain'], '+.4f')}, SE {_num(c['se'], '.4f')})"

    parts = [f"Mixes measured with {mix_settings(result)}."]
    if helped:
        parts.append("Helped by the declared rule: " + "; ".join(say(c) for c in helped) + ".")
    if hurt:
        parts.append("Hurt by the declared rule: " + "; ".join(say(c) for c in hurt) + ".")
    if unmeasurable:
        parts.append("Not measurable here (real-only is already saturated, so no added data could show a gain): "
                     + "; ".join(f"{say(c)}: {c['verdict']}{_rule_alone(c)}" for c in unmeasurable) + ".")
    if too_few:
        parts.append(f"{NOT_ENOUGH_SEEDS.capitalize()} for a verdict: " + "; ".join(say(c) for c in too_few) + ".")
    if not helped:
        if hurt:
            parts.append("No mix helped: train on the real rows alone (adding these synthetic rows made the model "
                         "worse on real test patients).")
        elif len(unmeasurable) + len(too_few) == len(mixes):
            parts.append("No verdict on whether the rows help could be made here.")
        else:
            parts.append("No mix helped: train on the real rows alone; the synthetic rows made no difference the "
                         "rule can call real.")
    return " ".join(parts)
