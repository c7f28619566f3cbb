"""What a run shows in the Prefect UI: its result at a glance, its report with the pictures, its scores.

The Prefect UI renders markdown artifacts, images included, but cannot reach files on the
machine that ran the flow; so the figures go into the markdown as data URIs (PNG thumbnails,
a few hundred KB per report), and every output is named by its full path. Created only
inside a flow or task run (Prefect's artifact API needs one).
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.run_dir import RunPaths
from tasks.shared.markdown_tables import markdown_table, ui_table_rows
from tasks.rendering.report import acceptance_thresholds, bars_summary, warnings_of

THUMBNAIL_WIDTH = 900
MONTAGES_IN_UI = 12
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def png_data_uri(path: Path, max_width: int = THUMBNAIL_WIDTH) -> str:
    """The PNG at ``path``, downscaled to ``max_width`` when wider, as a data: URI."""
    from PIL import Image

    with Image.open(path) as img:
        if img.width > max_width:
            img = img.resize((max_width, round(img.height * max_width / img.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def inline_images(markdown: str, base: Path) -> str:
    """Markdown whose image links (relative to ``base``) carry the images themselves."""

    def embed(match: re.Match) -> str:
        path = base / match.group(2)
        return f"![{match.group(1)}]({png_data_uri(path)})" if path.is_file() else match.group(0)

    return _IMAGE_LINK.sub(embed, markdown)


def result_markdown(run_dir: Path, report: dict[str, Any], summary: dict[str, Any]) -> str:
    """One glance: the quality bars, any warning, where the outputs are, the models used."""
    paths = RunPaths.of(run_dir)
    lines = [f"# brvo-augment: {bars_summary(report)}", ""]
    lines += [f"**WARNING** {w}" + "  " for w in warnings_of(report)]
    syn = report.get("synthetic") or {}
    rows = [["augmented.h5", f"`{summary['augmented_h5']}`"],
            ["rows", f"{summary['n_real']} real + {summary['n_synthetic']} synthetic, "
                     f"{summary['n_accepted']} accepted"],
            ["dataset card", f"`{paths.dataset_card}`"],
            ["report", f"`{paths.report_md}` (and report.json)"],
            ["figures", f"`{paths.figures}`"]]
    for model in ("pix2pix", "crgan"):
        section = report.get(model) or {}
        origin = f"registry {section['registry_version']}" if section.get("registry_version") else "trained in this run"
        rows.append([model, f"{origin}{_headline(model, section)}"])
    rows += [[bar, "met" if met else "**NOT MET**"] for bar, met in (report.get("bars") or {}).items()]
    if syn.get("degenerate_labels") is not None:
        rows.append(["degenerate synthetic labels", syn["degenerate_labels"]])
    trend = syn.get("stage_trend")
    if trend and trend.get("real_slope_per_stage") is not None and trend.get("synthetic_slope_per_stage") is not None:
        verdict = ", ".join(w.upper() for w in ("flat", "offset") if trend.get(w)) or "kept"
        rows.append(["treatment effect (label density per stage)", f"real {trend['real_slope_per_stage']:+.4f}, "
                     f"synthetic {trend['synthetic_slope_per_stage']:+.4f}: {verdict}"])
    lines += ["", markdown_table(["", ""], rows)]
    return "\n".join(lines) + "\n"


def _headline(model: str, section: dict[str, Any]) -> str:
    if model == "pix2pix" and section.get("test"):
        base = ", ".join(f"{k} {v['dice']:.3f}" for k, v in (section.get("baselines") or {}).items())
        return f": test Dice {section['test']['dice']:.3f} ({base})"
    heldout = section.get("heldout") or {}
    if model == "crgan" and heldout.get("model"):
        base = ", ".join(f"{k} {v['ssim']:.3f}" for k, v in (heldout.get("baselines") or {}).items())
        return f": held-out SSIM {heldout['model']['ssim']:.3f} ({base})"
    return ""


def montages_markdown(run_dir: Path, report: dict[str, Any]) -> str:
    figures = [Path(f) for f in report.get("figures") or [] if "timelines" in Path(f).parts]
    lines = ["# Timeline montages", "",
             f"{len(figures)} patients, one montage each, in `{RunPaths.of(run_dir).figures / 'timelines'}`; "
             f"the {min(len(figures), MONTAGES_IN_UI)} with the most synthetic stages are shown. Frames: green real, "
             "red synthetic accepted, grey synthetic rejected; captions name the sample, the stage's accepted "
             "count and the shown sample's scores.", ""]
    for path in figures[:MONTAGES_IN_UI]:
        if path.is_file():
            lines += [f"![{path.stem}]({png_data_uri(path)})", ""]
    return "\n".join(lines)


def score_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The scores table: per score its summary, the acceptance rule and how many samples it rejected (string
    cells escaped: the UI renders each as markdown, where '>= 0.2' would be a blockquote)."""
    syn = report.get("synthetic") or {}
    rules = acceptance_thresholds(report)
    return ui_table_rows(
        {"score": name, **{k: round(float(v), 4) for k, v in vals.items()},
         "accepted when": rules.get(name, ""), "rejected by it": (syn.get("rejected_by") or {}).get(name, 0)}
        for name, vals in (syn.get("scores") or {}).items())


def publish_augment_artifacts(run_dir: Path, report: dict[str, Any], summary: dict[str, Any]) -> None:
    paths = RunPaths.of(run_dir)
    create_markdown_artifact(key="augment-result", markdown=result_markdown(run_dir, report, summary),
                             description=f"{bars_summary(report)}: outputs of {run_dir}")
    create_markdown_artifact(key="augment-report", markdown=inline_images(paths.report_md.read_text(), paths.root),
                             description=f"brvo-augment report for {run_dir} (figures inline)")
    rows = score_rows(report)
    if rows:
        create_table_artifact(key="augment-scores", table=rows,
                              description="synthetic sample scores: mean, p10, p90, acceptance rule, rejections")
    create_markdown_artifact(key="augment-montages", markdown=montages_markdown(run_dir, report),
                             description="per-patient timelines: real and synthetic stages with their decisions")


#: The scores each retrain table shows, and their format: the ones the quality bars compare.
_RETRAIN_SCORES = {"pix2pix": (("dice", "Dice", ".3f"), ("cldice", "clDice", ".3f")),
                   "crgan": (("ssim", "SSIM", ".3f"), ("psnr", "PSNR", ".2f"))}


def retrain_markdown(result: dict[str, Any]) -> str:
    """The retrain's result: the promotion decision first, then every quality bar met or NOT MET beside the
    numbers it compared (so both fit the first screen of the UI's artifact page), the WARNINGs, each
    model's held-out scores beside its baselines, the scores compared with ``latest``, and the run's facts."""
    status, version = result.get("status", "?"), result.get("version")
    promotion = result.get("promotion") or {}
    title = {"published": f"published {version}, not promoted", "retrained": f"retrained {version}"}.get(status, status)
    lines = [f"# retrain: {title}", ""]
    if status == "retrained":
        lines.append(f"**Promoted**: {promotion.get('summary', '')}. `latest` -> **{version}** (was "
                     f"{result.get('previous_version') or 'none'}); augment runs use it from now on.")
    elif status == "published":
        latest = result.get("latest")
        kept = (f"`latest` stays {latest} (augment runs keep using it)" if latest else
                "No version is `latest` yet, so augment runs train their own models (with a WARNING)")
        lines.append(f"**Not promoted**: {promotion.get('summary', '')}. {kept}; {version} keeps its scores and "
                     "this decision (promotion.json, report.md) and can still be pinned with model_version.")
    elif status == "no change":
        lines.append(f"Neither the data nor the config changed since **{version}**: nothing retrained."
                     + ("" if result.get("promoted", True) else
                        f" It was not promoted ({promotion.get('summary') or 'no decision recorded'}); `latest` "
                        f"stays {result.get('latest') or 'none'}."))
    else:
        lines.append(f"**Failed**: {result.get('error', '')}. `latest` stays where it was; rerun to resume from "
                     f"`{result.get('work_dir', '')}`.")
    lines.append("")
    bars, scores = promotion.get("bars") or {}, result.get("scores") or {}
    if bars:
        rows = [[bar, "met" if met else "**NOT MET**", *_bar_evidence(bar, scores)] for bar, met in bars.items()]
        lines += ["## Quality bars", "", markdown_table(["bar", "", "this retrain", "to beat"], rows), ""]
    warnings = [f"**WARNING** {warning}  " for warning in result.get("warnings") or []]
    lines += warnings + ([""] if warnings else [])
    lines += _retrain_score_tables(scores)
    lines += _champion_table(promotion)
    facts = [[key, f"`{result[key]}`"] for key in ("soul_dir", "registry_dir", "fingerprint", "n_files",
                                                   "config_hash", "seconds", "finished_utc") if key in result]
    facts += [[f"time: {step}", f"{secs} s"] for step, secs in (result.get("timings_s") or {}).items()
              if step != "cached"]
    lines += ["## Run", "", markdown_table(["", ""], facts)]
    return "\n".join(lines) + "\n"


def _retrain_score_tables(scores: dict[str, Any]) -> list[str]:
    """Per model: its held-out scores beside its baselines (the numbers the quality bars compare)."""
    out: list[str] = []
    for model, label, what in (("pix2pix", "Pix2Pix", "labels"), ("crgan", "CRGAN", "images")):
        section = scores.get(model) or {}
        if not section.get("model"):
            continue
        metrics = _RETRAIN_SCORES[model]
        rows = [[f"{label} (this retrain)", *(_number(section["model"].get(key), spec) for key, _, spec in metrics)]]
        rows += [[f"baseline: {name}", *(_number(values.get(key), spec) for key, _, spec in metrics)]
                 for name, values in (section.get("baselines") or {}).items()]
        out += [f"## {label} {what} on {section.get('on', 'held-out data')}: beside the baselines", "",
                markdown_table(["", *(name for _, name, _ in metrics)], rows), ""]
    return out


def _bar_evidence(bar: str, scores: dict[str, Any]) -> tuple[str, str]:
    """A bar's numbers, short enough for one table line: this retrain's, and what it had to beat (the best
    baseline per score, or the other patients' SSIM). Empty where the result does not carry them."""
    model = {"pix2pix_beats_baselines": "pix2pix", "crgan_beats_baselines": "crgan"}.get(bar)
    if model:
        section = scores.get(model) or {}
        ours, baselines = section.get("model") or {}, section.get("baselines") or {}
        mine, best = [], []
        for key, name, spec in _RETRAIN_SCORES[model]:
            mine.append(f"{name} {_number(ours.get(key), spec)}")
            values = {b: v[key] for b, v in baselines.items() if isinstance(v.get(key), (int, float))}
            if values:
                top = max(values, key=values.get)
                best.append(f"{name} {_number(values[top], spec)} ({top})")
        return ", ".join(mine) if ours else "", ", ".join(best)
    own = (scores.get("crgan") or {}).get("own_vs_other_ssim") or {}
    if bar == "crgan_patient_specific" and "own" in own:
        return (f"SSIM to own patient {_number(own.get('own'), '.3f')}",
                f"SSIM to other patients {_number(own.get('other'), '.3f')}")
    return "", ""


def _champion_table(promotion: dict[str, Any]) -> list[str]:
    """The challenger's scores beside the ``latest`` it was compared with, on this run's held-out data."""
    champion, comparison = promotion.get("champion"), promotion.get("comparison") or {}
    notes = [f"- {note}" for note in promotion.get("notes") or []]
    if not champion or not (comparison or notes):
        return []
    rows = [[f"{model} {name}", _number(pair.get("challenger"), ".4f"), _number(pair.get("champion"), ".4f")]
            for model, metrics in _RETRAIN_SCORES.items() for key, name, _ in metrics
            for pair in [(comparison.get(model) or {}).get(key)] if pair]
    on = "; ".join(f"{model}: {where}" for model, where in (promotion.get("compared_on") or {}).items())
    out = [f"## Compared with latest {champion}", ""]
    if rows:
        out += [markdown_table(["score", "this retrain", f"latest {champion} (same data)"], rows), ""]
        out += [f"Both scored on this run's held-out data{f' ({on})' if on else ''}; a score below latest's keeps "
                "latest.", ""]
    return out + (notes + [""] if notes else [])


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def publish_retrain_artifact(result: dict[str, Any]) -> None:
    create_markdown_artifact(key="retrain-result", markdown=retrain_markdown(result),
                             description=f"retrain: {result.get('status')} {result.get('version') or ''}".strip())
