"""The use a longitudinal study makes of filled stages: each patient's course, the population's, a responder call.

Why: a BRVO study reads a biomarker over the six stages for every patient. Missed visits leave
holes, and what fills them changes the study's answers: a complete-case analysis (each stage's
mean over the patients seen there) is biased when who keeps coming depends on the course;
carrying the last observation forward flattens every course; interpolation bends it only between
visits. A generator's fill is worth having where it brings the study closer to the truth than
these, so every method is judged against the truth of the missed visits (a phantom's truth dir)
on the three things a study reports, paired by patient:

- the per-patient course: MAE over the stages the patient missed, and over all six;
- the population's mean course: each stage's mean over the cohort, minus the truth's;
- a responder / non-responder call at the last stage, from the change since the first.

Plain functions on per-(patient, stage) biomarker values (no files, no Prefect);
``benchmarks/course_study.py`` reads a run and a truth dir and calls them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

N_STAGES = 6
#: Every method a study could use for the missed stages, in the order the tables show them.
METHODS = ("complete_case", "locf", "interpolation", "crgan_accepted", "crgan_all")
#: Methods that give every patient a value at every stage (complete-case leaves the missed stages empty).
FILLING_METHODS = METHODS[1:]
#: A patient responds when the truth's non-perfusion index at the last stage is at most this share of the first's.
RESPONDER_SHARE = 0.6
#: The paired rule's multiple of the standard error.
SE_MULTIPLE = 2.0


@dataclass
class PatientCourse:
    """One patient's biomarker per stage from every source (stage -> value; means over that pair's images).

    ``truth``: all six stages (the observed visits' real scans, the truth scans of the missed ones).
    ``observed``: the stages the patient attended. ``crgan_accepted`` / ``crgan_all``: the missed stages
    with synthetic rows (accepted ones only / every row); a missed stage without any falls back to
    interpolation.
    """
    patient_id: str
    truth: Sequence[float]
    observed: Mapping[int, float]
    crgan_accepted: Mapping[int, float] = field(default_factory=dict)
    crgan_all: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.truth) != N_STAGES:
            raise ValueError(f"patient {self.patient_id}: truth has {len(self.truth)} stages, expected {N_STAGES}")
        if not self.observed:
            raise ValueError(f"patient {self.patient_id}: no observed stage; a course needs at least one visit")

    @property
    def missed(self) -> list[int]:
        return [s for s in range(N_STAGES) if s not in self.observed]


# ------------------------------------------------------------------------------------------------ the methods

def locf_course(observed: Mapping[int, float]) -> np.ndarray:
    """Each stage takes the nearest observed stage's value, a tie to the earlier (the last observation carried
    forward; before the first visit, the first observation carried back)."""
    stages = sorted(observed)
    return np.array([observed[min(stages, key=lambda o: (abs(o - s), o))] for s in range(N_STAGES)], np.float64)


def interpolated_course(observed: Mapping[int, float]) -> np.ndarray:
    """Linear between the observed neighbours; outside the first and last visit, the nearest one carried."""
    stages = sorted(observed)
    return np.interp(np.arange(N_STAGES), stages, [observed[s] for s in stages]).astype(np.float64)


def complete_case_course(observed: Mapping[int, float]) -> np.ndarray:
    """The observed stages only; NaN where the patient was not seen."""
    return np.array([observed.get(s, math.nan) for s in range(N_STAGES)], np.float64)


def filled_course(observed: Mapping[int, float], filled: Mapping[int, float]) -> np.ndarray:
    """The observed stages, the fill's values at the missed ones, interpolation where the fill left a stage empty."""
    out = interpolated_course(observed)
    for s, value in filled.items():
        if s not in observed:
            out[s] = value
    return out


def courses(patient: PatientCourse) -> dict[str, np.ndarray]:
    """The patient's six-stage course under every method in :data:`METHODS`."""
    return {"complete_case": complete_case_course(patient.observed),
            "locf": locf_course(patient.observed),
            "interpolation": interpolated_course(patient.observed),
            "crgan_accepted": filled_course(patient.observed, patient.crgan_accepted),
            "crgan_all": filled_course(patient.observed, patient.crgan_all)}


# ------------------------------------------------------------------------------------------------ measures

def is_responder(course: Sequence[float], share: float = RESPONDER_SHARE) -> bool | None:
    """The last stage's value is at most ``share`` of the first's (None where either is missing)."""
    first, last = float(course[0]), float(course[-1])
    if math.isnan(first) or math.isnan(last):
        return None
    return last <= share * first


def patient_errors(patient: PatientCourse) -> dict[str, dict[str, float | None]]:
    """Per method: MAE against the truth over the missed stages ('filled', None without any) and over all six
    ('all'); complete-case has neither (it gives no value at a missed stage)."""
    truth = np.asarray(patient.truth, np.float64)
    missed = patient.missed
    out: dict[str, dict[str, float | None]] = {}
    for method, course in courses(patient).items():
        if method == "complete_case":
            out[method] = {"filled": None, "all": None}
            continue
        err = np.abs(course - truth)
        out[method] = {"filled": float(err[missed].mean()) if missed else None, "all": float(err.mean())}
    return out


def population_course(patients: Sequence[PatientCourse], method: str) -> np.ndarray:
    """Each stage's mean over the cohort under ``method`` (complete-case: over the patients seen there; NaN
    where nobody was)."""
    stack = np.stack([courses(p)[method] for p in patients])
    seen = ~np.isnan(stack)
    with np.errstate(invalid="ignore"):
        return np.where(seen.any(0), np.nansum(stack, 0) / np.maximum(seen.sum(0), 1), math.nan)


def true_population_course(patients: Sequence[PatientCourse]) -> np.ndarray:
    return np.mean([np.asarray(p.truth, np.float64) for p in patients], axis=0)


def population_error(patients: Sequence[PatientCourse], method: str) -> np.ndarray:
    """Per stage: the method's population mean minus the truth's (signed)."""
    return population_course(patients, method) - true_population_course(patients)


def _bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def population_bootstrap(patients: Sequence[PatientCourse], methods: Sequence[str] = METHODS,
                         n_resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Each method's population error per stage (method's mean - the truth's) on the same patient resamples (so
    methods are paired by patient): method -> (n_resamples, 6), NaN at a stage nobody in a resample attended
    (complete case)."""
    stacks = {m: np.stack([courses(p)[m] for p in patients]) for m in methods}
    truth = np.stack([np.asarray(p.truth, np.float64) for p in patients])
    out = {m: np.empty((n_resamples, N_STAGES)) for m in methods}
    for b, idx in enumerate(_bootstrap_indices(len(patients), n_resamples, seed)):
        true_mean = truth[idx].mean(0)
        for m in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a stage nobody in the resample attended
                out[m][b] = np.nanmean(stacks[m][idx], 0) - true_mean
    return out


def _mean_abs(errors: np.ndarray) -> np.ndarray:
    """Mean |error| over the stages of each resample (NaN stages left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.abs(errors), axis=-1)


def paired(differences: Sequence[float], multiple: float = SE_MULTIPLE) -> dict:
    """Mean of paired differences (A - B), its standard error, and the rule's verdict: 'A lower' when the mean
    is below -multiple x SE, 'A higher' above +multiple x SE, else 'no difference shown'; with fewer than two
    pairs the SE is undefined and the verdict is 'not enough pairs'."""
    d = np.asarray([x for x in differences if x is not None and not math.isnan(x)], np.float64)
    n = len(d)
    if n < 2:
        return {"n": n, "mean": float(d.mean()) if n else None, "se": None, "verdict": "not enough pairs"}
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    if se == 0.0:
        verdict = "no difference shown" if mean == 0.0 else ("A lower" if mean < 0 else "A higher")
    else:
        verdict = "A lower" if mean < -multiple * se else "A higher" if mean > multiple * se else "no difference shown"
    return {"n": n, "mean": mean, "se": se, "verdict": verdict}


# ------------------------------------------------------------------------------------------------ the study

#: Pairs of methods the verdicts compare (A, B): the fill against each baseline, the baselines against each other.
#: Against complete case only the population mean and the responder call compare (it has no per-patient course).
COMPARISONS = (("crgan_accepted", "interpolation"), ("crgan_all", "interpolation"), ("crgan_accepted", "locf"),
               ("crgan_all", "locf"), ("crgan_accepted", "crgan_all"), ("interpolation", "locf"),
               ("crgan_accepted", "complete_case"), ("crgan_all", "complete_case"),
               ("interpolation", "complete_case"), ("locf", "complete_case"))


def study(patients: Sequence[PatientCourse], *, responder_share: float = RESPONDER_SHARE,
          n_resamples: int = 1000, seed: int = 0) -> dict:
    """Every measure of every method on one run's cohort, and the within-run paired comparisons.

    - ``patient``: per patient and method, MAE over the missed stages and over all six;
    - ``course_error``: per method, the mean over patients with a missed stage of those MAEs;
    - ``population``: per method, the population mean course, its error per stage with a patient-bootstrap
      SE (``biased`` where |error| > 2 SE), and the mean |error| over stages with its bootstrap SE;
    - ``responders``: per method, the call's accuracy against the truth's (complete-case: over the
      patients seen at the first and the last stage only, the only ones it can call);
    - ``paired``: per comparison (A, B), :func:`paired` on the per-patient filled-stage MAE, on the
      per-patient correct call, and on the bootstrap of the population mean |error|.
    """
    if not patients:
        raise ValueError("no patients")
    per_patient = {p.patient_id: patient_errors(p) for p in patients}
    with_gaps = [p for p in patients if p.missed]
    course_error = {}
    for m in METHODS:
        filled = [per_patient[p.patient_id][m]["filled"] for p in with_gaps]
        every = [per_patient[p.patient_id][m]["all"] for p in patients]
        course_error[m] = {"filled": None if None in filled or not filled else float(np.mean(filled)),
                           "all": None if None in every else float(np.mean(every)), "n_patients": len(with_gaps)}

    truth_calls = {p.patient_id: is_responder(p.truth, responder_share) for p in patients}
    calls = {m: {p.patient_id: is_responder(courses(p)[m], responder_share) for p in patients} for m in METHODS}
    correct = {m: {pid: None if c is None else c == truth_calls[pid] for pid, c in calls[m].items()} for m in METHODS}
    responders = {m: {"n_called": sum(v is not None for v in correct[m].values()),
                      "accuracy": _share([v for v in correct[m].values() if v is not None])} for m in METHODS}

    per_stage = population_bootstrap(patients, METHODS, n_resamples, seed)
    boot = {m: _mean_abs(v) for m, v in per_stage.items()}
    true_course = true_population_course(patients)
    population = {}
    for m in METHODS:
        err = population_error(patients, m)
        error_se = [_nan_std(per_stage[m][:, s]) for s in range(N_STAGES)]
        population[m] = {"course": population_course(patients, m).tolist(), "error": err.tolist(),
                         "error_se": error_se,
                         "biased": [None if se is None or math.isnan(e) else bool(abs(e) > SE_MULTIPLE * se)
                                    for e, se in zip(err, error_se)],
                         "mae": float(np.nanmean(np.abs(err))) if not np.isnan(err).all() else None,
                         "mae_se": _nan_std(boot[m])}

    comparisons = {}
    for a, b in COMPARISONS:
        course = ({"n": 0, "mean": None, "se": None, "verdict": "not applicable"} if "complete_case" in (a, b) else
                  paired([per_patient[p.patient_id][a]["filled"] - per_patient[p.patient_id][b]["filled"]
                          for p in with_gaps]))
        call = paired([float(correct[a][pid]) - float(correct[b][pid]) for pid in truth_calls
                       if correct[a][pid] is not None and correct[b][pid] is not None])
        diff = boot[a] - boot[b]
        mean = population[a]["mae"] - population[b]["mae"] if None not in (population[a]["mae"],
                                                                          population[b]["mae"]) else None
        se = _nan_std(diff)
        pop = {"n": len(patients), "mean": mean, "se": se,
               "verdict": "not enough pairs" if mean is None or se is None else
               ("A lower" if mean < -SE_MULTIPLE * se else "A higher" if mean > SE_MULTIPLE * se
                else "no difference shown")}
        comparisons[f"{a} vs {b}"] = {"course_mae_filled": course, "responder_correct": call,
                                      "population_mae": pop}
    return {"n_patients": len(patients), "n_with_gaps": len(with_gaps),
            "n_missed_pairs": sum(len(p.missed) for p in patients),
            "observed_per_stage": [sum(s in p.observed for p in patients) for s in range(N_STAGES)],
            "responder_share": responder_share, "true_responders": sum(bool(v) for v in truth_calls.values()),
            "true_population_course": true_course.tolist(),
            "patient": per_patient, "course_error": course_error, "population": population,
            "responders": responders, "paired": comparisons}


def _share(values: Sequence[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def _nan_std(values: np.ndarray) -> float | None:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.std(ddof=1)) if len(v) >= 2 else None


def across_seeds(results: Sequence[dict]) -> dict[str, dict[str, str]]:
    """The declared rule over runs of one phantom with different training seeds: a comparison is called only
    when every run's within-run verdict agrees ('A lower' in all, or 'A higher' in all); with one run it is
    'not enough seeds' (the generator's run-to-run variation is not in a within-run SE)."""
    if not results:
        return {}
    out: dict[str, dict[str, str]] = {}
    for name in results[0]["paired"]:
        out[name] = {}
        for measure in results[0]["paired"][name]:
            verdicts = {r["paired"][name][measure]["verdict"] for r in results}
            if verdicts == {"not applicable"}:
                out[name][measure] = "not applicable"
            elif len(results) < 2:
                out[name][measure] = "not enough seeds"
            elif len(verdicts) == 1 and next(iter(verdicts)) in ("A lower", "A higher"):
                out[name][measure] = next(iter(verdicts))
            else:
                out[name][measure] = "no difference shown"
    return out


# ------------------------------------------------------------------------------------------------ tables

NAMES = {"complete_case": "observed only (complete case)", "locf": "last observation carried",
         "interpolation": "neighbour interpolation", "crgan_accepted": "CRGAN, accepted rows",
         "crgan_all": "CRGAN, all rows"}


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(result: dict, unit: str = "pp") -> str:
    """The methods' rows (course MAE, population error, responder accuracy), the population course per stage and
    the within-run paired comparisons."""
    header = (f"{result['n_patients']} patients ({result['n_with_gaps']} with a missed stage, "
              f"{result['n_missed_pairs']} missed pairs; seen per stage {result['observed_per_stage']}), "
              f"{result['true_responders']} true responders (last <= {result['responder_share']:.0%} of first)")
    columns = (f"| method | course MAE, missed stages ({unit}) | course MAE, all six ({unit}) | population mean: "
               f"mean abs error over stages ({unit}) +- SE | responder call: accuracy (n called) |")
    lines = [header, "", columns, "|---|---|---|---|---|"]
    for m in METHODS:
        c, p, r = result["course_error"][m], result["population"][m], result["responders"][m]
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f} ({r['n_called']})"
        lines.append(f"| {NAMES[m]} | {_f(c['filled'])} | {_f(c['all'])} | {_f(p['mae'])} +- {_f(p['mae_se'])} "
                     f"| {acc} |")
    lines += ["", "| population mean per stage | " + " | ".join(f"s{s}" for s in range(N_STAGES)) + " |",
              "|---" * (N_STAGES + 1) + "|",
              "| truth | " + " | ".join(_f(v) for v in result["true_population_course"]) + " |"]
    for m in METHODS:
        lines.append(f"| {NAMES[m]}: error | " + " | ".join(_f(v, 2) for v in result["population"][m]["error"])
                     + " |")
    comparison_columns = ("| A vs B (within run) | course MAE, missed: A - B +- SE | verdict | responder correct: "
                          "A - B +- SE | verdict | population mean abs error: A - B +- SE | verdict |")
    lines += ["", comparison_columns, "|---|---|---|---|---|---|---|"]
    for name, comp in result["paired"].items():
        cells = []
        for measure in ("course_mae_filled", "responder_correct", "population_mae"):
            v = comp[measure]
            cells += [f"{_f(v['mean'], 3)} +- {_f(v['se'], 3)}", v["verdict"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def patient_table(results: Sequence[dict], seeds: Sequence[int], observed: Mapping[str, Sequence[int]]) -> str:
    """Per patient with a missed stage: the stages seen, and each filling method's course MAE over the missed
    stages in every run (runs of one phantom, e.g. two training seeds; LOCF and interpolation do not depend
    on the run, so they are shown once)."""
    fills = ("crgan_accepted", "crgan_all")
    head = ["patient", "seen", NAMES["locf"], NAMES["interpolation"]]
    head += [f"{NAMES[m]}, seed {s}" for m in fills for s in seeds]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    first = results[0]["patient"]
    for pid, errors in first.items():
        if errors["locf"]["filled"] is None:
            continue
        cells = [pid, "".join(str(s) for s in observed[pid]), _f(errors["locf"]["filled"]),
                 _f(errors["interpolation"]["filled"])]
        cells += [_f(r["patient"][pid][m]["filled"]) for m in fills for r in results]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
