"""Does the treatment effect survive in the synthetic rows? Vessel density across stages, within patients.

Image scores can all look fine while a filled timeline is flat, which erases what a BRVO researcher
fills it for. The real effect per stage and the synthetic rows' slope and offset against it are the
report's 'synthetic.stage_trend'; a flat or offset trend is a WARNING. docs/steps.md has the method.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from storage.paired_format import STAGE_NAMES

#: the synthetic slope must carry at least this share of the real treatment effect
MIN_EFFECT_SHARE = 0.5
#: the real effect counts as present when its slope exceeds this many standard errors
MIN_REAL_T = 2.0


def _mean_density(meta: pd.DataFrame, density: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"patient_id": meta["patient_id"].astype(str).to_numpy(),
                          "stage": meta["stage"].astype(int).to_numpy(), "density": np.asarray(density, np.float64)})
    return frame.groupby(["patient_id", "stage"], sort=True)["density"].mean().reset_index()


def real_changes(real: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gaps, density changes, patient index) of every ordered pair a < b of each patient's observed real stages."""
    gaps, changes, who = [], [], []
    for k, (_, rows) in enumerate(real.groupby("patient_id")):
        st, de = rows["stage"].to_numpy(), rows["density"].to_numpy()
        for i in range(len(st)):
            for j in range(i + 1, len(st)):
                gaps.append(st[j] - st[i])
                changes.append(de[j] - de[i])
                who.append(k)
    return np.asarray(gaps, np.float64), np.asarray(changes, np.float64), np.asarray(who, np.int64)


def synthetic_changes(real: pd.DataFrame, synthetic: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(signed gaps, density changes) of each (patient, synthetic stage) to the patient's nearest real stage."""
    by_patient = {pid: rows for pid, rows in real.groupby("patient_id")}
    gaps, changes = [], []
    for pid, stage, dens in synthetic[["patient_id", "stage", "density"]].itertuples(index=False):
        rows = by_patient.get(pid)
        if rows is None:
            continue
        st = rows["stage"].to_numpy()
        k = int(np.lexsort((st, np.abs(st - stage)))[0])  # nearest, the earlier on a tie
        gaps.append(stage - st[k])
        changes.append(dens - rows["density"].to_numpy()[k])
    return np.asarray(gaps, np.float64), np.asarray(changes, np.float64)


def _slope_through_origin(x: np.ndarray, y: np.ndarray, cluster: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y = slope * x and its standard error, clustered by patient: a patient's pairs
    share its scans, so the patient, not the pair, is the independent unit (the sandwich estimator)."""
    if len(x) < 2 or not np.any(x) or len(np.unique(cluster)) < 2:
        return float("nan"), float("nan")
    sxx = float((x * x).sum())
    slope = float((x * y).sum() / sxx)
    score = np.bincount(cluster, weights=x * (y - slope * x))
    g = len(score)
    se = math.sqrt(g / (g - 1) * float((score ** 2).sum())) / sxx
    return slope, se


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(bias, slope) of a least-squares line; slope NaN when every gap is the same."""
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2 or np.ptp(x) == 0:
        return float(np.mean(y)), float("nan")
    slope, bias = np.polyfit(x, y, 1)
    return float(bias), float(slope)


def stage_trend(meta: pd.DataFrame, density: np.ndarray) -> dict:
    """The check on one dataset: ``meta`` has patient_id, stage, is_synthetic and (synthetic rows) accepted;
    ``density`` is each row's label vessel fraction, in meta's order. Returns the report.json section."""
    meta = meta.reset_index(drop=True)
    density = np.asarray(density, np.float64)
    is_syn = meta["is_synthetic"].astype(bool).to_numpy()
    accepted = meta["accepted"].fillna(False).astype(bool).to_numpy() if "accepted" in meta else is_syn
    use = is_syn & accepted
    rows_used = "accepted"
    if is_syn.any() and not use.any():
        use, rows_used = is_syn, "all (none accepted)"
    real = _mean_density(meta[~is_syn], density[~is_syn])
    syn = _mean_density(meta[use], density[use])
    rg, rc, who = real_changes(real)
    sg, sc = synthetic_changes(real, syn)
    real_slope, real_se = _slope_through_origin(rg, rc, who)
    bias, syn_slope = _line(sg, sc)
    effect_present = bool(np.isfinite(real_slope) and real_se > 0 and abs(real_slope) > MIN_REAL_T * real_se)
    share = syn_slope / real_slope if effect_present and np.isfinite(syn_slope) else float("nan")
    flat = bool(effect_present and np.isfinite(share) and share < MIN_EFFECT_SHARE)
    offset = bool(np.isfinite(real_slope) and np.isfinite(bias) and abs(bias) > abs(real_slope))
    def num(v: float) -> float | None:  # report.json stays strict JSON: no NaN
        return float(v) if np.isfinite(v) else None

    return {
        "synthetic_rows": rows_used,
        "n_real_pairs": int(len(rg)), "n_synthetic_stages": int(len(sg)),
        "real_slope_per_stage": num(real_slope), "real_slope_se": num(real_se), "real_effect_present": effect_present,
        "synthetic_slope_per_stage": num(syn_slope), "synthetic_bias": num(bias), "effect_share": num(share),
        "flat": flat, "offset": offset,
        "per_stage_density": {
            STAGE_NAMES[s]: {"real": float(real.loc[real["stage"] == s, "density"].mean()) if (real["stage"] == s).any() else None,
                     "synthetic": float(syn.loc[syn["stage"] == s, "density"].mean()) if (syn["stage"] == s).any() else None}
            for s in range(6)},
        "rule": (f"flat when the real effect is present (|slope| > {MIN_REAL_T:g} SE) and the synthetic slope carries "
                 f"less than {MIN_EFFECT_SHARE:.0%} of it; offset when the synthetic density at zero gap is off by more "
                 "than one stage of real change"),
    }


def trend_warnings(section: dict | None) -> list[str]:
    """WARNING lines for a stage_trend section (empty when the rows keep the effect)."""
    if not section:
        return []
    out = []
    real, syn = section.get("real_slope_per_stage"), section.get("synthetic_slope_per_stage")
    if section.get("flat"):
        out.append(f"the synthetic rows miss the treatment effect: their label vessel density changes {syn:+.4f} per "
                   f"stage from the patient's nearest real stage where real timelines change {real:+.4f} per stage "
                   f"({section['effect_share']:.0%} of it); do not use them to study change across stages")
    if section.get("offset"):
        out.append(f"the synthetic rows' label vessel density is offset by {section['synthetic_bias']:+.4f} from the "
                   f"patient's nearest real stage at zero gap, more than one stage of real change ({abs(real):.4f}); "
                   "densities of synthetic and real rows are not comparable")
    return out


def render_trend(section: dict | None) -> list[str]:
    """report.md lines: the per-stage table and the fitted effects."""
    if not section:
        return []

    def f(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    lines = ["## Treatment effect in the synthetic rows (label vessel density across stages)", "",
             f"Real: {section['n_real_pairs']} within-patient pairs of observed stages, slope "
             f"{f(section['real_slope_per_stage'])} per stage (SE {f(section['real_slope_se'])}). Synthetic "
             f"({section['synthetic_rows']} rows): {section['n_synthetic_stages']} (patient, stage) means against the "
             f"patient's nearest real stage, slope {f(section['synthetic_slope_per_stage'])} per stage of gap, offset "
             f"{f(section['synthetic_bias'])} at zero gap. Rule: {section['rule']}.", "",
             "| stage | mean density, real | mean density, synthetic |", "|---|---|---|"]
    for stage, v in section["per_stage_density"].items():
        lines.append(f"| {stage} | {f(v['real'])} | {f(v['synthetic'])} |")
    verdict = [w for w in ("flat", "offset") if section.get(w)]
    lines += ["", f"Verdict: {'; '.join(verdict) if verdict else 'the synthetic rows keep the treatment effect'}.", ""]
    return lines
