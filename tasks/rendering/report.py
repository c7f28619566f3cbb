"""report.json, report.md and DATASET_CARD.md: built from the step results at the end of every run.

report.json is the single source of the numbers; report.md and the card render it. Its schema is
storage.report_schema: each step's section model, assembled here into a validated ``Report``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from storage import report_schema
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.shared.markdown_tables import markdown_table
from tasks.score import AcceptanceThresholds
from tasks.analyses.stage_trend import render_trend, trend_warnings
from tasks.engine import PlanRun, Step
from tasks.analyses.quality_bars import BAR_MEANING, bar_checks
from tasks.analyses.usefulness_protocol import render_markdown, usage_advice, usefulness_warnings

PAPER_CONTEXT = ("The SOUL paper's segmenters (pre-trained on ROSE-1) reach Dice 0.72 (U-Net) to 0.77 (OCTA-Net) "
                 "on real SOUL labels. That is a different dataset from this run's input when it is the phantom.")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):  # NaN (None after a JSON round trip): not measured
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _num(v: Any, spec: str) -> str:
    """``v`` formatted by ``spec``; 'n/a' where it was not measured (NaN in memory, null in report.json)."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def _table(rows: dict[str, dict[str, Any]], keys: list[str]) -> str:
    """One row per name, one column per key (tasks.shared.markdown_tables escapes what the cells say)."""
    return markdown_table(["", *keys], [[name, *(_fmt(vals.get(k, "")) for k in keys)] for name, vals in rows.items()])


#: What each quality bar asks, in the words a WARNING line uses.
def bars_summary(report: dict[str, Any]) -> str:
    """'N of M quality bars met' (the flow run's final state message)."""
    bars = bar_checks(report)
    return f"{sum(bars.values())} of {len(bars)} quality bars met" if bars else "no quality bar measured"


#: Fewer held-out test patients than this and the report warns that its verdicts describe those patients only.
#: The bars and the usefulness rule compare methods on the same test images, and the usefulness SE counts
#: training seeds, not patients: with 4 or fewer patients one patient is a quarter of the evidence or more, and
#: on the robustness grid one method's test Dice moved by 0.01-0.04 between its two seeds (each its own draw of
#: 2-8 test patients), more than the margins the bars decide on.
MIN_TEST_PATIENTS = 5


def n_test_patients(report: dict[str, Any]) -> int | None:
    """How many held-out test patients the run's comparisons rest on (None when the report does not say)."""
    n = (report.get("pix2pix") or {}).get("n_test_patients")
    if n is None:
        n = ((report.get("usefulness") or {}).get("patients") or {}).get("test")
    return None if n is None else int(n)


def warnings_of(report: dict[str, Any]) -> list[str]:
    """Every result a user must not miss: each missed quality bar, too few test patients for the verdicts
    to generalise, no accepted synthetic sample, synthetic rows that lose the treatment effect
    (tasks/analyses/stage_trend.py), degenerate synthetic labels.
    Logged as WARNING lines and printed at the top of report.md and the card."""
    out = [f"quality bar not met: {bar} ({BAR_MEANING.get(bar, bar)})"
           for bar, met in bar_checks(report).items() if not met]
    n_test = n_test_patients(report)
    if n_test is not None and n_test < MIN_TEST_PATIENTS:
        out.append(f"only {n_test} held-out test patient(s): the quality bars and the usefulness verdicts describe "
                   f"these patients, not your population (fewer than {MIN_TEST_PATIENTS}; the usefulness SE counts "
                   "training seeds, not patients); confirm on more patients before relying on them")
    syn = report.get("synthetic") or {}
    if syn.get("n") and not syn.get("accepted"):
        out.append(f"none of the {syn['n']} synthetic samples was accepted: every one failed a score threshold "
                   "(see the score table and figures/score_histograms.png)")
    fallback = ((syn.get("thresholds") or {}).get("calibration") or {}).get("fallback_reason")
    if fallback:
        out.append(f"acceptance thresholds not calibrated on real rows: {fallback}")
    for name, reason in ((report.get("usefulness") or {}).get("skipped_arms") or {}).items():
        out.append(f"usefulness: the {name} arms were not run: {reason}")
    out += usefulness_warnings(report.get("usefulness") or {})
    out += trend_warnings(syn.get("stage_trend"))
    out += _degenerate_warnings(syn)
    return out


#: At least this share of degenerate synthetic labels and the WARNING says the labeller failed: Pix2Pix labels
#: images of the same patients' missing stages, so a working labeller's labels fall inside the training
#: annotations' range nearly always; when most do not, the labels as a whole are broken, not a few samples.
LABELLER_FAILED_SHARE = 0.5


def _degenerate_warnings(syn: dict[str, Any]) -> list[str]:
    """Degenerate synthetic labels (empty, all vessel, or outside the training annotations' density range):
    always rejected by the score step; counted here by reason, and named a labeller failure when most are."""
    degenerate, n = syn.get("degenerate_labels") or 0, syn.get("n") or 0
    if not degenerate:
        return []
    reasons = ", ".join(f"{count} {why}" for why, count in (syn.get("degenerate_by") or {}).items())
    reasons = reasons or "empty, all vessel, or outside the training annotations' range"
    text = f"{degenerate} of {n} synthetic labels are degenerate ({reasons}) and none of them is accepted"
    if n and degenerate / n >= LABELLER_FAILED_SHARE:
        text += (f": the labeller failed ({degenerate / n:.0%} of its labels); the synthetic rows' labels of this "
                 "run are not usable, retrain Pix2Pix (see its test Dice against the baselines)")
    return [text]


def _models_line(report: dict[str, Any]) -> str:
    parts = []
    for model in ("pix2pix", "crgan"):
        section = report.get(model) or {}
        if section:
            origin = (f"registry version {section['registry_version']}" if section.get("registry_version")
                      else "trained in this run")
            parts.append(f"{'Pix2Pix' if model == 'pix2pix' else 'CRGAN'}: {origin}")
    return "; ".join(parts)


def acceptance_thresholds(report: dict[str, Any]) -> dict[str, str]:
    """The acceptance rule of this run, score by score (what `accepted` means): the thresholds the score
    step used (report.json synthetic.thresholds), else, for a report written before they were recorded,
    the config's constants."""
    recorded = (report.get("synthetic") or {}).get("thresholds")
    if recorded:
        return AcceptanceThresholds.model_validate(recorded).rules()
    config = report.get("config") or {}
    if not config:
        return {}
    return {"consistency_ssim": f">= {config.get('min_consistency_ssim')}",
            "realism": f">= {config.get('min_realism')}",
            "density_z": f"|z| <= {config.get('max_abs_density_z')}",
            "label_confidence": f">= {config.get('min_label_confidence')}"}


def acceptance_source(report: dict[str, Any]) -> str:
    """Where this run's acceptance thresholds came from, and the label-density floor (empty when not recorded)."""
    t = (report.get("synthetic") or {}).get("thresholds") or {}
    floor = (f" Whatever the thresholds, label_density must lie in the range of the training annotations "
             f"({t['label_density_source']}): an empty, all-vessel or otherwise degenerate label is never accepted."
             if t.get("label_density_source") else "")
    return _threshold_source(t) + floor


def _threshold_source(t: dict[str, Any]) -> str:
    cal = t.get("calibration") or {}
    if t.get("source") == "calibrated":
        return (f"Thresholds calibrated on {cal.get('rows')} held-out real rows ({cal.get('patients')} patients of the "
                f"{cal.get('split')} split), scored as the synthetic samples are: consistency_ssim, density_z and "
                f"label_confidence each reject {cal.get('quantile', 0):.0%} of those real rows; together with "
                f"realism's fixed bound and the label-density floor they accept "
                f"{_num(cal.get('real_pass_rate'), '.0%')} of them.")
    if cal.get("fallback_reason"):
        return f"Fixed thresholds (calibration fell back: {cal['fallback_reason']})."
    return "Fixed thresholds (config acceptance = 'fixed')." if t else ""


#: The figures report.md shows inline (paths relative to the run directory), and how many montages.
FIGURES_SHOWN = ("figures/training_curves.png", "figures/score_histograms.png")
MONTAGES_SHOWN = 3


def _segmenter_text(params: dict[str, Any] | None) -> str:
    """How the supervised-segmenter baseline was made, in one sentence (empty when the run has none)."""
    if not params:
        return ""
    text = (f" The segmenter baseline ({params.get('arch', 'supervised CNN')}) trained {params.get('steps')} steps on "
            f"the same train rows; its weights (step {params.get('best_step')}) and threshold "
            f"{_fmt(params.get('threshold'))} were chosen on validation patients.")
    flipped = params.get("flip_averaged_test")
    if flipped:
        text += (f" For comparison, not a bar: the same segmenter averaged over each image's four flips, as Pix2Pix "
                 f"labels, scores Dice {_fmt(flipped.get('dice'))}, clDice {_fmt(flipped.get('cldice'))}.")
    return text


def _labelling_text(p2p: dict[str, Any]) -> str:
    """How Pix2Pix turns an image into a label, in one sentence (empty for runs that did not record it)."""
    if "flip_average" not in p2p:
        return ""
    return (" Labels are the mean of the generator's probabilities over each image's four flips."
            if p2p["flip_average"] else " Labels are one pass of the generator per image.")


def _image_quality_lines(section: dict[str, Any] | None) -> list[str]:
    """report.md's distribution-level image quality: pooled numbers per extractor, then KID per stage."""
    if not section:
        return []
    from tasks.analyses.image_quality import SHOWN

    out = ["## Image quality: synthetic vs held-out real images", "",
           f"{section['n_synthetic']} synthetic images ({section['synthetic_rows']}) against "
           f"{section['n_held_out_real']} real images of the val and test patients; the ceiling row puts the "
           f"{section['n_train_real']} real training images in place of the synthetic ones (other real patients: "
           "what a generator of new patients would match). "
           + "; ".join(f"{k}: {v}" for k, v in SHOWN.items()) + ".", ""]
    rows: dict[str, dict[str, Any]] = {}
    for extractor, stages in section["extractors"].items():
        pooled = stages.get("all") or {}
        rows[f"synthetic ({extractor})"] = pooled
        if pooled.get("baseline"):
            rows[f"ceiling: real train ({extractor})"] = pooled["baseline"]
    out += [_table(rows, list(SHOWN)), ""]
    stages = {stage: v for stage, v in (section["extractors"].get("random_cnn") or {}).items() if stage != "all"}
    per_stage = {stage: {"KID synthetic": v.get("kid_mean"), "KID ceiling": (v.get("baseline") or {}).get("kid_mean"),
                         "n synthetic": v.get("n_synthetic"), "n real": v.get("n_real")} for stage, v in stages.items()}
    if per_stage:
        # the reasons are sentences: beneath the table, which the UI draws on one line per row
        reasons = [f"- {stage}: {v['reason']}" for stage, v in stages.items() if v.get("reason")]
        out += ["Per stage (random-CNN features):", "",
                _table(per_stage, ["KID synthetic", "KID ceiling", "n synthetic", "n real"]), ""]
        out += ["Why a stage has no synthetic KID:", "", *reasons, ""] if reasons else []
    return out


def _how_step_ran(report: dict[str, Any], step: str, cached: list[str]) -> str:
    """The timings table's note: computed, served from the cache, or a model loaded from the registry."""
    if step == "total":
        return ""
    if step in cached:
        return "served from cache"
    version = (report.get(step) or {}).get("registry_version") if step in ("pix2pix", "crgan") else None
    return f"loaded registry version {version}" if version else "ran"


#: How the truth-free held-out estimates tracked the truth of the missed visits on phantoms (docs/fill-truth.md).
TRACKING_NOTE = ("On four phantoms, where the missed visits can be rendered, this held-out share correlated +0.60 with "
                 "the share the fill carried against the truth, off by 45 points on average (16 runs, 4-8 held-out "
                 "cases each): read it as a direction, not a measurement.")
GAP_TITLES = {"interior": "between two visits", "after_last": "after the last visit", "before_first": "before the first"}


def _gap_lines(per_gap: dict[str, Any] | None) -> list[str]:
    """The held-out cases by gap kind: image scores beside the baselines and the course the estimate carries."""
    if not per_gap:
        return []
    rows = []
    for kind, g in per_gap.items():
        course = g.get("course") or {}
        carried = course.get("carried")
        rows.append([GAP_TITLES.get(kind, kind), g["n"], *(_fmt(g[k]["ssim"]) for k in ("model", "nearest", "neighbour_mean")),
                     _num(course.get('real_change_mean'), '+.2f'), _num(course.get('model_change_mean'), '+.2f'),
                     "n/a" if carried is None else f"{100 * carried:.0f} %"])
    return ["By kind of gap (SSIM; the course: change in the non-perfusion index, percentage points, from the nearest "
            "other observed stage, real stage and estimate, and the share of the real change the estimate carries):", "",
            markdown_table(["gap", "n", "CRGAN", "nearest", "neighbour_mean", "real change", "estimate change",
                            "course carried"], rows), ""]


def render_report(report: dict[str, Any], data_source: str) -> str:
    out = ["# brvo-augment run report", "", f"Input: {data_source}", ""]
    bars = bar_checks(report)
    if bars:
        out += [f"**{bars_summary(report)}.**", ""]
    warnings = warnings_of(report)
    if warnings:
        out += [f"> **WARNING** {w}" for w in warnings] + [""]
    if _models_line(report):
        out += [f"Models: {_models_line(report)}.", ""]
    if bars:
        out += ["## Quality bars", "",
                markdown_table(["bar", "met"], [[name, "yes" if ok else "**no**"] for name, ok in bars.items()]), ""]
    p2p = report.get("pix2pix")
    if p2p:
        rows = {"Pix2Pix": p2p["test"], **{f"baseline: {k}": v for k, v in p2p.get("baselines", {}).items()}}
        out += ["## Pix2Pix labels on held-out test patients", "",
                f"{p2p.get('n_test_patients', '?')} test patients at {p2p.get('image_size', '?')} px; Pix2Pix "
                f"threshold {_fmt(p2p.get('threshold'))} ({p2p.get('threshold_source', '?')}); Frangi's scales and "
                "threshold tuned on train/val patients." + _segmenter_text(p2p.get("segmenter_params"))
                + f" Generator objective: {p2p.get('objective', 'not recorded')}." + _labelling_text(p2p), "",
                _table(rows, ["dice", "iou", "cldice", "n"]), "", PAPER_CONTEXT, ""]
    crg = report.get("crgan", {}).get("heldout")
    if crg:
        rows = {"CRGAN": crg["model"], **{f"baseline: {k}": v for k, v in crg.get("baselines", {}).items()}}
        out += ["## CRGAN: held-out real stages hidden and regenerated (val + test patients)", "",
                f"{crg.get('n', '?')} cases (each observed stage of each val/test patient, hidden and regenerated "
                "from the rest; the model row is the zero-noise estimate).", "",
                _table(rows, ["ssim", "psnr", "mse", "cosine"]), ""]
        test_only = crg.get("test_only")
        if test_only:
            rows = {"CRGAN": test_only["model"], "baseline: nearest": test_only["nearest"],
                    "baseline: neighbour_mean": test_only["neighbour_mean"]}
            out += [f"Test patients only ({test_only['n']} cases; the checkpoint was chosen on val patients):", "",
                    _table(rows, ["ssim", "psnr", "mse", "cosine"]), ""]
        per_stage = crg.get("per_stage") or {}
        if per_stage:
            rows = [[stage, r.get("n", ""), *(f"{_fmt(r[k]['ssim'])} / {r[k]['psnr']:.2f}" if r.get(k) else ""
                                               for k in ("model", "nearest", "neighbour_mean"))]
                    for stage, r in per_stage.items()]
            out += ["Per stage (SSIM / PSNR):", "",
                    markdown_table(["stage", "n", "CRGAN", "nearest", "neighbour_mean"], rows), ""]
        out += _gap_lines(crg.get("per_gap"))
        sq = report.get("crgan", {}).get("sample_quality")
        if sq:
            out += [f"Sample quality: diversity {_fmt(sq.get('diversity'))}; SSIM to own patient "
                    f"{_fmt(sq.get('own_vs_other_ssim', {}).get('own'))} vs other patients "
                    f"{_fmt(sq.get('own_vs_other_ssim', {}).get('other'))}.", ""]
    syn = report.get("synthetic")
    if syn:
        rules = acceptance_thresholds(report)
        scores = {name: {**vals, "accepted when": rules.get(name, ""),
                         "rejected by it": (syn.get("rejected_by") or {}).get(name, "")}
                  for name, vals in (syn.get("scores") or {}).items()}
        out += ["## Synthetic samples", "",
                f"{syn['n']} samples, {syn['accepted']} accepted (a sample is accepted when every score is inside "
                f"its threshold); {syn.get('degenerate_labels', 0)} degenerate labels. {acceptance_source(report)}", "",
                _table(syn["per_stage"], ["real", "synthetic", "accepted"]), "",
                _table(scores, ["mean", "p10", "p90", "accepted when", "rejected by it"]), ""]
    out += render_trend((syn or {}).get("stage_trend"))
    out += _image_quality_lines(report.get("image_quality"))
    use = report.get("usefulness")
    if use and use.get("arms"):
        out += ["## Usefulness: do the synthetic rows help a model on real test patients?", "",
                render_markdown(use), "", f"**How to use the rows:** {usage_advice(use)}", ""]
    if report.get("timings_s"):
        cached = report["timings_s"].get("cached") or []
        rows = {k: {"seconds": v, "this run": _how_step_ran(report, k, cached)}
                for k, v in report["timings_s"].items() if k != "cached"}
        out += ["## Timings (s)", "", _table(rows, ["seconds", "this run"]), ""]
        if cached:
            out += ["A step served from the cache keeps the time of the run that computed it.", ""]
    figures = report.get("figures") or []
    if figures:
        montages = [f for f in figures if "/timelines/" in f.replace("\\", "/")]
        out += ["## Figures", ""]
        for rel in FIGURES_SHOWN:
            if any(f.endswith(rel) for f in figures):
                out += [f"![{Path(rel).stem.replace('_', ' ')}]({rel})", ""]
        for f in montages[:MONTAGES_SHOWN]:
            rel = "figures/timelines/" + Path(f).name
            out += [f"![{Path(f).stem.replace('_', ' ')}]({rel})", ""]
        out += [f"All {len(montages)} timeline montages (one per patient): figures/timelines/.", ""]
    return "\n".join(out)


def _label_rule(attrs: dict[str, Any]) -> str:
    """The preprocess label rule of the file's config ('nearest' for files made before the option). Dice and
    vessel density depend on it, so a consumer comparing with other data needs it."""
    try:
        rule = json.loads(attrs.get("config_json") or "{}").get("label_resize", "nearest")
    except (TypeError, ValueError):
        return "an unrecorded rule"
    return {"nearest": "nearest neighbour", "max": "max (any vessel pixel in the footprint)",
            "area": "area (vessels cover at least half the footprint)"}.get(rule, str(rule))


def _origin(attrs: dict[str, Any]) -> dict[str, Any]:
    """What the file's real rows are (tasks.export.data_origin, recorded in its attrs; unknown for older files)."""
    from tasks.export import UNKNOWN_ORIGIN

    recorded = attrs.get("data_origin")
    return json.loads(recorded) if recorded else UNKNOWN_ORIGIN.model_dump()


def render_card(report: dict[str, Any], attrs: dict[str, Any], data_source: str) -> str:
    syn = report.get("synthetic", {})
    origin = _origin(attrs)
    per_stage = syn.get("per_stage", {})
    rules = acceptance_thresholds(report)
    warnings = [f"> **WARNING** {w}" for w in warnings_of(report)]
    return "\n".join([
        "# Dataset card: brvo-augment augmented OCTA dataset",
        "",
        *(warnings + [""] if warnings else []),
        "## What it is",
        "Paired (en-face OCTA image, binary vessel label) samples of Branch Retinal Vein Occlusion patients across six "
        "anti-VEGF treatment stages (s1t1 < s1t2 < s2t1 < s2t2 < s3t1 < s3t2). Real rows come from the input; "
        "synthetic rows fill each patient's missing stages."
        + (" Here the input is the built-in phantom: its patients are procedural, not people."
           if origin["kind"] == "phantom" else ""),
        "",
        "## How it was made",
        f"Input: {data_source}. Pipeline: ingest -> preprocess ({attrs.get('image_size')} px, annotations resized by "
        f"{_label_rule(attrs)}) -> Pix2Pix "
        "(image -> vessel label) -> CRGAN (patient + stage + noise, LSTM over stages) -> fill every missing "
        f"(patient, stage) with {attrs.get('samples_per_missing')} samples -> label with Pix2Pix -> score -> export.",
        f"Models: {_models_line(report) or 'not recorded'}.",
        f"Code version {attrs.get('code_version')}; Pix2Pix checkpoint sha256 {attrs.get('pix2pix_sha256')}; "
        f"CRGAN checkpoint sha256 {attrs.get('crgan_sha256')}; source (soul.h5) sha256 {attrs.get('source_sha256')}.",
        "",
        "## Counts per stage",
        _table(per_stage, ["real", "synthetic", "accepted"]) if per_stage else "(none)",
        "",
        f"Total: {attrs.get('n_real')} real, {attrs.get('n_synthetic')} synthetic ({syn.get('accepted', 0)} accepted).",
        "",
        "## Scores (synthetic rows; NaN on real rows)",
        "consistency_ssim (SSIM to the patient's nearest real stage), realism (CRGAN discriminator probability), "
        "density_z (label vessel density vs the patient's real labels, in population standard deviations), "
        "label_confidence (mean per-pixel Pix2Pix confidence). `accepted` applies the run's thresholds; rejected "
        "samples are kept so you can choose your own.",
        "",
        ("Acceptance thresholds of this run (a sample is accepted when all hold): "
         + "; ".join(f"{k} {v}" for k, v in rules.items()) + ". " + acceptance_source(report)) if rules else "",
        "",
        _table(syn.get("scores", {}), ["mean", "p10", "p90"]) if syn.get("scores") else "",
        "",
        *_card_evidence(report),
        "## Load it",
        "```python",
        "import h5py, pandas as pd",
        "with h5py.File('augmented.h5') as f:",
        "    meta = pd.DataFrame({k: f['meta'][k].asstr()[:] if f['meta'][k].dtype.kind == 'S' else f['meta'][k][:] for k in f['meta']})",
        "    keep = (~meta.is_synthetic | meta.accepted).to_numpy()",
        "    images, labels = f['images'][:][keep], f['labels'][:][keep]   # uint8 (N,H,W); labels 0/1",
        "```",
        "",
        "## Licence and attribution",
        origin["attribution"],
        "",
        "## Caveat",
        "Synthetic images and their Pix2Pix labels are for research augmentation only, not for diagnosis or any "
        "clinical decision. Their labels are model outputs, not expert annotations (label_source = 'pix2pix').",
        "",
    ])


def _card_evidence(report: dict[str, Any]) -> list[str]:
    """What this run measured about its own quality, so a reader of the card alone sees it."""
    lines = ["## How good is it (measured in this run; details in report.md)"]
    p2p = report.get("pix2pix") or {}
    if p2p.get("test"):
        base = "; ".join(f"{k} {_num(v['dice'], '.3f')}" for k, v in (p2p.get("baselines") or {}).items())
        objective = f" Generator objective: {p2p['objective']}." if p2p.get("objective") else ""
        objective += _labelling_text(p2p)
        lines.append(f"- Pix2Pix labels on held-out real test patients: Dice {_num(p2p['test']['dice'], '.3f')} "
                     f"(baselines: {base}).{objective}")
    crg = (report.get("crgan") or {}).get("heldout") or {}
    if crg.get("model"):
        base = "; ".join(f"{k} {_num(v['ssim'], '.3f')}" for k, v in (crg.get("baselines") or {}).items())
        lines.append(f"- CRGAN on real stages hidden and regenerated: SSIM {_num(crg['model']['ssim'], '.3f')} "
                     f"(baselines: {base}).")
        after = (crg.get("per_gap") or {}).get("after_last")
        if after and after.get("course"):
            carried = after["course"].get("carried")
            lines.append(f"- After the last visit (SOUL's common gap; {after['n']} held-out stages): SSIM "
                         f"{_num(after['model']['ssim'], '.3f')} against {_num(after['nearest']['ssim'], '.3f')} for a copy of the "
                         f"last visit; the estimate carries "
                         f"{'an undefined share' if carried is None else f'{100 * carried:.0f} %'} of the real change "
                         f"in non-perfusion ({_num(after['course']['real_change_mean'], '+.2f')} points). {TRACKING_NOTE}")
    quality = ((report.get("image_quality") or {}).get("extractors") or {}).get("random_cnn", {}).get("all")
    if quality and quality.get("baseline"):
        lines.append(f"- Synthetic vs held-out real images (random-CNN features, all stages): KID "
                     f"{_fmt(quality['kid_mean'])} (real images of other patients: {_fmt(quality['baseline']['kid_mean'])}; "
                     f"lower is better), precision {_fmt(quality['precision'])}, recall {_fmt(quality['recall'])}.")
    use = report.get("usefulness") or {}
    if use.get("arms"):
        lines += ["", "### Do the synthetic rows help? (usefulness protocol)", "", render_markdown(use), "",
                  f"**How to use the rows:** {usage_advice(use)}", ""]
    bars = bar_checks(report)  # derived from the numbers every time, like report.md; never a stale copy
    if bars:
        missed = [name for name, ok in bars.items() if not ok]
        lines.append(f"- {bars_summary(report)}" + (f"; not met: {', '.join(missed)}." if missed else "."))
    return lines + [""] if len(lines) > 1 else []


# ------------------------------------------------------------------------------- writing them


def build_report(plan: Sequence[Step], run: PlanRun, config: PipelineConfig) -> report_schema.Report:
    """report.json from this run's step results: each step's declared section (its typed model), timings,
    config, versions and the quality bars, validated as one :class:`storage.report_schema.Report`.

    Rebuilt from the step records at the end of every run, so it can never be stale or partial
    because a step was served from its cache (it is nobody's input). A step whose section the
    schema does not declare is refused here, so no section is written untyped."""
    from tasks.engine.run_record import versions

    schema = report_schema.Report  # looked up at call time: the one schema, wherever it is extended
    sections: dict[str, Any] = {}
    for step in plan:
        if step.report and step.name in run.outcomes:
            if step.report not in schema.model_fields:
                raise ValueError(f"step {step.name!r} fills report section {step.report!r}, which "
                                 f"storage.report_schema.Report does not declare: add a model for it there")
            sections[step.report] = run.result(step.name).report_section()
    fields = {**sections, "timings_s": run.timings(), "config": config.model_dump(mode="json"), "versions": versions()}
    bars = bar_checks(report_dict(schema.model_validate(fields)))  # the bars read the sections' numbers
    return schema.model_validate({**fields, "bars": bars} if bars else fields)


def report_dict(report: report_schema.Report) -> dict[str, Any]:
    """The report as the renderers and the flows read it: report.json's content, with NaN where a number was
    not measured (report.json itself writes null)."""
    return report.model_dump(mode="json", exclude_unset=True)


def write_documents(run_dir: Path, plan: Sequence[Step], run: PlanRun, config: PipelineConfig,
                    data_source: str, log_warnings: bool = True) -> dict[str, Any]:
    """Write report.json (strict JSON, validated by its schema), and report.md + DATASET_CARD.md once
    augmented.h5 exists; return the report's content (:func:`report_dict`).
    ``log_warnings`` False: the caller logs the WARNINGs itself (a retrain, once it knows where the
    documents will live: its work directory is deleted)."""
    from storage.atomic import write_text_atomic
    from storage.paired_format import validate

    from tasks.engine.logs import run_warning

    paths = RunPaths.of(run_dir)
    typed = build_report(plan, run, config)
    report = report_dict(typed)
    for warning in warnings_of(report) if log_warnings else ():
        run_warning(f"{warning}; see {paths.report_md}")
    write_text_atomic(paths.report_json, report_schema.report_text(typed))
    write_text_atomic(paths.report_md, render_report(report, data_source))
    if "export" in run.outcomes:
        write_text_atomic(paths.dataset_card, render_card(report, validate(paths.augmented_h5).attrs, data_source))
    return report
