"""Scarce labels, not scarce patients: what synthetic rows add for a clinic with many scans and few annotated.

A seeded share of the train patients is annotated (at least one); the other train patients' images stay
unlabelled. A label-scarce sub-run (the pipeline's own steps, :data:`tasks.analyses.usefulness_subsets.SUBSET_PLAN`
through the step engine, on a sub-run directory per seed) trains Pix2Pix on the annotated patients' rows only
(the config's ``labelled_train_patients``) and CRGAN on every train image: that is where unlabelled images can
bring information the annotated rows lack. The sub-run holds the train and validation patients and no test
patient; the validation patients only select checkpoints and thresholds.

Five arms train the usefulness protocol's segmenter and are scored on the test patients' real rows:

    labelled_only       the annotated patients' real rows
    plus_pseudo_labels  + the unlabelled train images with the sub-run Pix2Pix's labels (self-training: the same
                        information without a generator, the bar synthetic rows must beat)
    plus_synthetic      + the sub-run's accepted synthetic rows (CRGAN images, Pix2Pix labels)
    plus_both           + both
    repeated_labelled   the annotated rows repeated to the size of plus_synthetic (more rows, no new information)

Every arm gets the protocol's augmentation and its step budget chosen on the validation patients
(:func:`budget_recipe`). Comparisons are paired by seed under the protocol's rule
(:func:`tasks.analyses.usefulness_protocol.paired_verdict`); each names its baseline's role.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from brvo_models.configs import UsefulnessConfig
from tasks.analyses.usefulness_protocol import (
    PRIMARY,
    RULE,
    Rows,
    StudyData,
    SubsetRequest,
    curve_fractions,
    filter_synthetic,
    gated,
    judge_gate,
    paired_verdict,
    render_gate,
    run_segmentation,
    run_segmentation_seeds,
)

LABELLED_ONLY = "labelled_only"
PLUS_PSEUDO = "plus_pseudo_labels"
PLUS_SYNTHETIC = "plus_synthetic"
PLUS_BOTH = "plus_both"
REPEATED = "repeated_labelled"
ARMS = (LABELLED_ONLY, PLUS_PSEUDO, PLUS_SYNTHETIC, PLUS_BOTH, REPEATED)

REAL_ONLY = "real_only"
SAME_INFORMATION = "same_information_alternative"
COUNT_MATCHED = "count_matched_control"
#: (arm, baseline, what the baseline stands for); synthetic rows help only where they beat real-only AND self-training
COMPARISONS = (
    (PLUS_PSEUDO, LABELLED_ONLY, REAL_ONLY),
    (PLUS_SYNTHETIC, LABELLED_ONLY, REAL_ONLY),
    (PLUS_BOTH, LABELLED_ONLY, REAL_ONLY),
    (REPEATED, LABELLED_ONLY, REAL_ONLY),
    (PLUS_SYNTHETIC, PLUS_PSEUDO, SAME_INFORMATION),
    (PLUS_BOTH, PLUS_PSEUDO, SAME_INFORMATION),
    (PLUS_SYNTHETIC, REPEATED, COUNT_MATCHED),
)
METRICS = ("dice", "cldice")  # dice is the protocol's primary metric: the verdicts that count
#: The step budgets an arm chooses from on the validation patients (see :func:`budget_recipe`)
BUDGETS = (300, 600)
BUDGET_RULE = ("each arm's step budget is chosen on the validation patients' real rows, per seed, among "
               f"{'/'.join(str(b) for b in BUDGETS)} steps: one fit of {max(BUDGETS)} steps validated every "
               f"{min(BUDGETS) // 10} steps keeps the weights of the best validation Dice (the protocol's recipe at a "
               "constant learning rate draws the same batches whatever the budget, so this chooses among the "
               "budgets' own best-on-validation weights, on a finer grid); the chosen step is reported")


def labelled_patients(train_patients: Iterable[str], fraction: float, seed: int) -> list[str]:
    """The annotated train patients: ``fraction`` of them (at least one), drawn by ``seed``; nested across
    fractions for one seed (the 10 % lie inside the 25 %)."""
    pool = sorted(set(train_patients))
    if not pool:
        raise ValueError("no train patient to annotate")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng([int(seed), 0x1ABE1]).permutation(len(pool))
    n = min(len(pool), max(1, int(round(fraction * len(pool)))))
    return sorted(pool[i] for i in order[:n])


def budget_recipe(config: UsefulnessConfig) -> UsefulnessConfig:
    """The protocol's recipe with the budget choice of :data:`BUDGET_RULE` (max budget, finest validation grid)."""
    steps = max(BUDGETS)
    segmenter = config.segmenter.model_copy(update={"steps": steps, "validations": steps // (min(BUDGETS) // 10)})
    return config.model_copy(update={"segmenter": segmenter})


def repeat_rows(rows: Rows, n: int, seed: int) -> Rows:
    """``rows`` repeated to ``n`` rows: every row as often as fits, the remainder a seeded draw without repeats."""
    if len(rows) == 0 or n <= len(rows):
        return rows
    whole, rest = divmod(n, len(rows))
    extra = np.random.default_rng([int(seed), 0xC0DE]).choice(len(rows), rest, replace=False)
    return rows.where(np.concatenate([np.tile(np.arange(len(rows)), whole), np.sort(extra)]))


# ------------------------------------------------------------------------------------ the sub-run


@dataclass(frozen=True)
class LabelScarceRows:
    """What a label-scarce sub-run gives the arms: its synthetic rows of the train patients (``accepted`` kept),
    the unlabelled train patients' real images with its Pix2Pix's labels, and how many rows each model saw."""

    synthetic: Rows
    pseudo_labelled: Rows
    pix2pix_train_rows: int
    crgan_train_patients: int
    seconds: float = 0.0


class LabelScarceMaker(Protocol):
    def __call__(self, labelled: Sequence[str], seed: int) -> LabelScarceRows: ...


class PipelineLabelScarceMaker:
    """Runs the pipeline's steps on ``work_dir/seed<seed>`` (one sub-run per seed: CRGAN, which trains on every
    train image, is the same for every fraction and is served from its record; Pix2Pix and what reads it
    recompute for each labelled set), with ``config`` plus the seed and the labelled patients."""

    def __init__(self, config, soul_h5: Path, train_patients: Sequence[str], selection_patients: Sequence[str],
                 work_dir: Path) -> None:
        self.config = config
        self.soul_h5 = Path(soul_h5)
        self.train_patients = tuple(sorted(train_patients))
        self.selection_patients = tuple(sorted(selection_patients))
        self.work_dir = Path(work_dir)
        self.last_run = None  # the engine's PlanRun of the latest call (which steps were served from records)

    def __call__(self, labelled: Sequence[str], seed: int) -> LabelScarceRows:
        from brvo_models.pix2pix import label_images, load_labeller
        from storage.paired_format import read_arrays, read_meta
        from tasks.analyses.usefulness_subsets import PipelineSubsetMaker

        t0 = time.perf_counter()
        labelled = tuple(sorted(labelled))
        request = SubsetRequest(soul_h5=self.soul_h5, train_patients=self.train_patients,
                                selection_patients=self.selection_patients, seed=seed,
                                work_dir=self.work_dir / f"seed{seed}")
        maker = PipelineSubsetMaker(self.config.with_overrides(labelled_train_patients=labelled))
        synthetic = maker(request)
        run = self.last_run = maker.last_run
        pix2pix, crgan = run.result("pix2pix"), run.result("crgan")
        sub_soul = Path(run.result("preprocess").path)
        meta = read_meta(sub_soul)
        real = ~meta["is_synthetic"].to_numpy(bool)
        pid = meta["patient_id"].astype(str).to_numpy()
        train = real & (meta["split"].to_numpy() == "train")
        n_labelled_rows = int((train & np.isin(pid, labelled)).sum())
        if pix2pix.training.get("n_train") != n_labelled_rows:  # the isolation this study rests on
            raise RuntimeError(f"the sub-run's Pix2Pix trained on {pix2pix.training.get('n_train')} rows, the "
                               f"labelled patients have {n_labelled_rows}")
        unlabelled = np.flatnonzero(train & ~np.isin(pid, labelled))
        images, _ = read_arrays(sub_soul, unlabelled)  # their annotations are never read
        generator, device = load_labeller(pix2pix.checkpoint_path, self.config.device, self.config.image_size)
        _, masks = label_images(generator, images, threshold=self.config.pix2pix.threshold, device=device)
        n = len(unlabelled)
        pseudo = Rows(images.astype(np.uint8), masks.astype(np.uint8), pid[unlabelled],
                      meta["stage"].to_numpy(np.int64)[unlabelled], np.zeros(n, bool), np.ones(n, bool))
        return LabelScarceRows(synthetic=synthetic, pseudo_labelled=pseudo, pix2pix_train_rows=n_labelled_rows,
                               crgan_train_patients=int(crgan.training.get("n_train_patients", -1)),
                               seconds=round(time.perf_counter() - t0, 1))


# ------------------------------------------------------------------------------------------ the arms


def arm_rows(real_train: Rows, labelled: Sequence[str], made: LabelScarceRows, seed: int) -> dict[str, Rows]:
    """The five arms' train rows for one seed and labelled set (see the module docstring)."""
    labelled_rows = real_train.of_patients(labelled)
    if set(made.pseudo_labelled.patient_id.tolist()) & set(labelled):
        raise ValueError("pseudo-labelled rows of annotated patients: they must be the unlabelled patients' only")
    train_ids = set(real_train.patients)
    outside = set(made.synthetic.patient_id.tolist()) - train_ids
    if outside:
        raise ValueError(f"synthetic rows of patients outside the train split: {sorted(outside)[:5]}")
    synthetic = filter_synthetic(made.synthetic.where(made.synthetic.is_synthetic), "accepted")
    plus_synthetic = Rows.concat(labelled_rows, synthetic)
    return {
        LABELLED_ONLY: labelled_rows,
        PLUS_PSEUDO: Rows.concat(labelled_rows, made.pseudo_labelled),
        PLUS_SYNTHETIC: plus_synthetic,
        PLUS_BOTH: Rows.concat(labelled_rows, made.pseudo_labelled, synthetic),
        REPEATED: repeat_rows(labelled_rows, len(plus_synthetic), seed),
    }


def tag(fraction: float) -> str:
    return f"labels_{int(round(fraction * 100))}"


def measure_seeds(data: StudyData, config: UsefulnessConfig, fractions: Sequence[float], maker: LabelScarceMaker,
                  seeds: Iterable[int], *, log: Callable[[str], None] = print, device: str = "auto",
                  on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every fraction x arm for ``seeds``: {'arms': {name: per-seed lists, keyed by seed}, 'subruns': {...}}.
    Seeds are independent (each its own sub-run), so they may be measured in separate processes and merged."""
    real_train, val, evaluate = data.real["train"], data.real["val"], data.real[config.eval_split]
    recipe = budget_recipe(config)
    measured: dict[str, Any] = {"arms": {}, "subruns": {}}
    for seed in seeds:
        for fraction in fractions:
            labelled = labelled_patients(real_train.patients, fraction, seed)
            made = maker(labelled, seed)
            measured["subruns"][f"{tag(fraction)}_seed{seed}"] = {
                "labelled_patients": labelled, "pix2pix_train_rows": made.pix2pix_train_rows,
                "crgan_train_patients": made.crgan_train_patients, "synthetic_rows": len(made.synthetic),
                "accepted_synthetic_rows": int(made.synthetic.accepted.sum()),
                "pseudo_labelled_rows": len(made.pseudo_labelled), "seconds": made.seconds}
            log(f"label-scarce: seed {seed}, {fraction:.0%} labelled ({len(labelled)} patients): sub-run "
                f"{made.seconds:.0f} s, {int(made.synthetic.accepted.sum())} of {len(made.synthetic)} synthetic rows "
                f"accepted, {len(made.pseudo_labelled)} pseudo-labelled")
            for name, rows in arm_rows(real_train, labelled, made, seed).items():
                out = run_segmentation(rows, val, evaluate, recipe, seed, device)
                arm = measured["arms"].setdefault(f"{tag(fraction)}_{name}", {"fraction": fraction, "arm": name,
                                                                             "per_seed": {}})
                arm["per_seed"][str(seed)] = {
                    "n_rows": len(rows), "n_synthetic_rows": int(rows.is_synthetic.sum()),
                    "n_pseudo_rows": int((~rows.is_synthetic & ~np.isin(rows.patient_id, labelled)).sum()),
                    "n_patients": len(rows.patients), "budget_step": int(out["best_step"]),
                    **{m: float(out[m]) for m in METRICS}}
                log(f"label-scarce: seed {seed} {tag(fraction)}_{name}: {len(rows)} rows, dice {out['dice']:.4f} "
                    f"cldice {out['cldice']:.4f} (budget step {int(out['best_step'])})")
                if on_progress is not None:
                    on_progress(measured)
    return measured


def merge_measured(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed measurements made apart (:func:`measure_seeds`), as one; a seed measured twice is an error."""
    merged: dict[str, Any] = {"arms": {}, "subruns": {}}
    for part in parts:
        for name, arm in part["arms"].items():
            into = merged["arms"].setdefault(name, {"fraction": arm["fraction"], "arm": arm["arm"], "per_seed": {}})
            twice = set(into["per_seed"]) & set(arm["per_seed"])
            if twice:
                raise ValueError(f"{name}: seed(s) {sorted(twice)} measured twice")
            into["per_seed"].update(arm["per_seed"])
        merged["subruns"].update(part["subruns"])
    return merged


def judge(measured: dict[str, Any], config: UsefulnessConfig) -> dict[str, Any]:
    """The arms' per-seed lists (sorted by seed) and every comparison by the protocol's rule; the same shape as
    the protocol's result (``arms``, ``comparisons`` with arm, baseline, task, metric, mean_gain, se, t_crit, n,
    verdict), each comparison also naming its baseline's role. A comparison pairs the seeds both arms were
    measured on; one whose arms are not both measured is listed in ``not_measured`` (an unfinished study)."""
    arms: dict[str, dict[str, Any]] = {}
    for name, arm in measured["arms"].items():
        seeds = sorted(arm["per_seed"], key=int)
        rows = [arm["per_seed"][s] for s in seeds]
        arms[name] = {"fraction": arm["fraction"], "arm": arm["arm"], "seeds": [int(s) for s in seeds],
                      **{k: [r[k] for r in rows] for k in rows[0]}}
    fractions = sorted({a["fraction"] for a in arms.values()})
    comparisons, not_measured = [], []
    for fraction in fractions:
        for arm, baseline, role in COMPARISONS:
            a, b = arms.get(f"{tag(fraction)}_{arm}"), arms.get(f"{tag(fraction)}_{baseline}")
            common = sorted(set(a["seeds"]) & set(b["seeds"])) if a and b else []
            if not common:
                not_measured.append(f"{tag(fraction)}_{arm} vs {tag(fraction)}_{baseline}")
                continue
            for metric in METRICS:
                pick = [dict(zip(x["seeds"], x[metric])) for x in (b, a)]
                comparisons.append({"arm": f"{tag(fraction)}_{arm}", "baseline": f"{tag(fraction)}_{baseline}",
                                    "baseline_role": role, "task": "segmentation", "metric": metric,
                                    "primary": metric == PRIMARY["segmentation"][0], "fraction": fraction,
                                    "seeds": common,
                                    **paired_verdict([pick[0][s] for s in common], [pick[1][s] for s in common],
                                                     higher_is_better=True)})
    return {
        "rule": RULE,
        "budget_rule": BUDGET_RULE,
        "eval_split": config.eval_split,
        "seeds": sorted({s for a in arms.values() for s in a["seeds"]}),
        "fractions": fractions,
        "config": config.model_dump(mode="json"),
        "arms": arms,
        "subruns": measured["subruns"],
        "comparisons": comparisons,
        "not_measured": not_measured,
        "synthetic_rows_beat_self_training": beats_self_training(comparisons),
    }


def run_label_scarce(data: StudyData, config: UsefulnessConfig, fractions: Sequence[float], maker: LabelScarceMaker,
                     *, log: Callable[[str], None] = print, device: str = "auto") -> dict[str, Any]:
    """The whole study in one process: every fraction x seed x arm, then the paired comparisons."""
    t0, c0 = time.perf_counter(), time.process_time()
    measured = measure_seeds(data, config, fractions, maker, range(config.seeds), log=log, device=device)
    result = judge(measured, config)
    result["patients"] = {s: len(r.patients) for s, r in data.real.items()}
    result["seconds"], result["cpu_seconds"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    return result


def labelled_curve(data: StudyData, config: UsefulnessConfig, fractions: Sequence[float], *, device: str = "auto",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The learning-curve gate of the label-scarce arms (usefulness_protocol.GATE_RULE): the labelled rows alone,
    per seed, at each labelled share, twice it and the full train split (the same draw, recipe and budget rule
    as the arms), judged by :func:`judge_gate`. An arm is measurable only where all the labels beat its share."""
    train, val, evaluate = data.real["train"], data.real["val"], data.real[config.eval_split]
    groups = {tag(f): float(f) for f in fractions}
    seeds, recipe = list(range(config.seeds)), budget_recipe(config)
    curve: dict[float, dict[str, Any]] = {}
    for f in curve_fractions(groups):
        trains = [train if f >= 1.0 else train.of_patients(labelled_patients(train.patients, f, s)) for s in seeds]
        out = run_segmentation_seeds(trains, val, evaluate, recipe, seeds, device)
        curve[f] = {"patients": [len(r.patients) for r in trains], "segmentation": [float(o["dice"]) for o in out]}
        log(f"label-scarce gate: labelled rows alone at {f:.0%} of the train patients "
            f"({np.mean(curve[f]['patients']):.0f}): Dice per seed " + ", ".join(f"{d:.4f}" for d in curve[f]["segmentation"]))
    return judge_gate(curve, groups, ["segmentation"])


def apply_gate(result: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """The study's result with the gate's say on every comparison (each adds rows to a smaller-information arm):
    ``verdict`` what may be claimed, ``rule_verdict`` the paired rule's own (usefulness_protocol.gated)."""
    comparisons = [gated(c, gate["groups"][tag(c["fraction"])]["tasks"]["segmentation"])
                   for c in result["comparisons"]]
    return {**result, "gate": gate, "comparisons": comparisons,
            "synthetic_rows_beat_self_training": beats_self_training(comparisons)}


def beats_self_training(comparisons: list[dict[str, Any]]) -> dict[str, bool]:
    """Per fraction: do the synthetic rows (alone or with the pseudo-labels) gain by the rule, on the primary
    metric, over BOTH the labelled rows alone and self-training? (the restated bar, read for this study)"""
    out = {}
    for fraction in sorted({c["fraction"] for c in comparisons}):
        primary = [c for c in comparisons if c["fraction"] == fraction and c["primary"]]

        def gains(arm: str, role: str) -> bool:
            return any(c["verdict"] == "gain" for c in primary if c["arm"].endswith(arm) and c["baseline_role"] == role)

        out[tag(fraction)] = any(gains(arm, REAL_ONLY) and gains(arm, SAME_INFORMATION)
                                 for arm in (PLUS_SYNTHETIC, PLUS_BOTH))
    return out


def _cell(values: list[float]) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.4f} +- {v.std(ddof=1) if v.size > 1 else 0.0:.4f}"


def render_markdown(result: dict[str, Any]) -> str:
    """Every arm (mean +- sd over seeds), then every comparison with its baseline's role and verdict."""
    lines = ["| labelled | arm | rows (synthetic / pseudo-labelled) | patients | budget step | seg Dice | seg clDice |",
             "|---|---|---|---|---|---|---|"]
    for arm in result["arms"].values():
        lines.append(f"| {arm['fraction']:.0%} | {arm['arm']} | {np.mean(arm['n_rows']):.0f} "
                     f"({np.mean(arm['n_synthetic_rows']):.0f} / {np.mean(arm['n_pseudo_rows']):.0f}) | "
                     f"{np.mean(arm['n_patients']):.0f} | {np.mean(arm['budget_step']):.0f} | {_cell(arm['dice'])} | "
                     f"{_cell(arm['cldice'])} |")
    lines += ["", "| comparison | baseline's role | metric | paired gain (SE) | needs > | verdict |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        verdict = f"**{c['verdict']}**" if c["primary"] else c["verdict"]
        if c.get("rule_verdict", c["verdict"]) != c["verdict"]:
            verdict += f" (the rule alone: {c['rule_verdict']})"
        lines.append(f"| {c['arm']} vs {c['baseline']} | {c['baseline_role']} | {c['metric']} | "
                     f"{c['mean_gain']:+.4f} ({c['se']:.4f}) | {c['t_crit']:.2f} SE (n {c['n']}) | {verdict} |")
    lines += ["", f"Scored on the real rows of the {result['eval_split']} patients; seeds {result['seeds']}. Rule: "
              f"{result['rule']}. Budget: {result['budget_rule']}."]
    if result.get("not_measured"):
        lines.append(f"**Not measured (the study did not finish):** {'; '.join(result['not_measured'])}.")
    if result.get("gate"):
        lines += render_gate(result["gate"])
    return "\n".join(lines)
