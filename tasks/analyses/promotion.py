"""Champion and challenger: whether a retrain's new models may replace the registry's ``latest``.

Every retrained version is published; ``latest`` moves to it only when its models meet their quality
bars (tasks.analyses.quality_bars) and score no worse than the current ``latest`` on the same held-out
data. The rules in full: docs/steps.md.
"""
from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from storage.errors import BrvoError
from storage.registry import ModelRegistry, RegisteredModels
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.analyses.quality_bars import bar_checks
from tasks.engine.logs import LogFn, run_log

#: What each model is compared on, higher is better: (metric key, name in a sentence).
COMPARED = {"pix2pix": (("dice", "Dice"), ("cldice", "clDice")), "crgan": (("ssim", "SSIM"), ("psnr", "PSNR"))}


class PromotionDecision(BaseModel):
    """Whether a challenger replaces ``latest``, and why (the registry keeps it as promotion.json)."""

    promote: bool
    reasons: list[str] = []  # why not (empty when promoted)
    bars: dict[str, bool] = {}
    champion: str | None = None  # the latest compared with (None: there was none)
    comparison: dict[str, dict[str, dict[str, float]]] = {}  # model -> metric -> challenger, champion
    compared_on: dict[str, str] = {}  # model -> the held-out data both were scored on
    notes: list[str] = []  # what was not compared, and why

    def summary(self) -> str:
        """One clause: '2 bars missed (a, b)', 'pix2pix test Dice 0.2 < latest v1's 0.3 ...', or why promoted."""
        if not self.promote:
            return "; ".join(self.reasons)
        bars = f"all {len(self.bars)} quality bar{'' if len(self.bars) == 1 else 's'} met"
        if self.champion is None:
            return f"{bars}; no latest to compare with"
        if not self.comparison:
            return f"{bars}; " + "; ".join(self.notes)
        return f"{bars}; not worse than latest {self.champion} on this run's held-out data"

    def record(self) -> dict[str, Any]:
        """What the registry stores and the retrain result shows."""
        return {**self.model_dump(mode="json"), "summary": self.summary()}


def challenger_scores(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The new models' held-out scores from the run's report, on the data :func:`champion_scores` uses."""
    out: dict[str, dict[str, float]] = {}
    test = (report.get("pix2pix") or {}).get("test")
    if test:
        out["pix2pix"] = dict(test)
    heldout = (report.get("crgan") or {}).get("heldout") or {}
    model = (heldout.get("test_only") or {}).get("model") or heldout.get("model")
    if model:
        out["crgan"] = dict(model)
    return out


def champion_scores(run_dir: str | os.PathLike, config: PipelineConfig, champion: RegisteredModels, *,
                    log: LogFn = run_log) -> dict[str, dict[str, float]]:
    """The champion's Pix2Pix and CRGAN scored on this run's held-out data, as the challenger's were
    (tasks.pix2pix.evaluate_pix2pix, tasks.crgan.evaluate_crgan). Each has an ``n``."""
    import numpy as np

    from brvo_models import batched_metrics
    from brvo_models.crgan import load_generator
    from brvo_models.crgan_data import heldout_cases
    from brvo_models.crgan_sampling import predict_heldout, score_cases
    from brvo_models.metrics import mean_scores
    from brvo_models.pix2pix import label_images, load_labeller
    from tasks.crgan import load_sequences
    from tasks.pix2pix import load_split, mask_scores

    soul = RunPaths.of(run_dir).soul_h5
    generator, device = load_labeller(champion.pix2pix_checkpoint, config.device, config.image_size)
    scores_device = batched_metrics.metrics_device(device, "auto")
    threshold = (champion.config.get("pix2pix") or {}).get("threshold")
    threshold = float(generator.label_threshold) if threshold is None else float(threshold)
    test_x, test_y, _ = load_split(soul, ("test",))
    _, masks = label_images(generator, test_x, threshold, batch_size=64, device=device)
    pix2pix = mask_scores(masks, test_y, scores_device)

    crgan_generator, _, device = load_generator(champion.crgan_checkpoint, config.device, config.image_size)
    seqs = load_sequences(soul)
    cases = heldout_cases(s for s in seqs if s.split == "test") or heldout_cases(
        s for s in seqs if s.split in ("val", "test"))
    preds = predict_heldout(crgan_generator, cases, seeds=[None], device=device)
    rows = score_cases([p[0] for p in preds], [seq.images[stage] for seq, stage in cases], scores_device)
    crgan = mean_scores(rows)
    log(f"promotion: latest {champion.version} on this run's held-out data: pix2pix dice {pix2pix['dice']:.4f} "
        f"cldice {pix2pix['cldice']:.4f} ({pix2pix['n']} test images); crgan ssim {crgan.get('ssim', np.nan):.4f} "
        f"psnr {crgan.get('psnr', np.nan):.4f} ({crgan['n']} cases)")
    return {"pix2pix": pix2pix, "crgan": crgan}


def decide_promotion(run_dir: str | os.PathLike, config: PipelineConfig, report: dict[str, Any],
                     champion: RegisteredModels | None, *, log: LogFn = run_log) -> PromotionDecision:
    """Promote the run's models (the report's 'pix2pix' and 'crgan' sections) over ``champion`` (the
    registry's current ``latest``, or None) or not: see the module docstring."""
    bars = bar_checks(report)
    missed = [bar for bar, met in bars.items() if not met]
    reasons = [f"{len(missed)} bar{'s' if len(missed) > 1 else ''} missed ({', '.join(missed)})"] if missed else []
    if not bars:
        reasons.append("no quality bar was measured")
    decision = PromotionDecision(promote=False, bars=bars, champion=champion.version if champion else None)
    if champion is not None:
        _compare(decision, run_dir, config, report, champion, log)
        reasons += _worse(decision)
    decision.reasons = reasons
    decision.promote = not reasons
    return decision


def decide_against_latest(run_dir: str | os.PathLike, config: PipelineConfig, report: dict[str, Any],
                          registry: ModelRegistry, *, log: LogFn = run_log) -> PromotionDecision:
    """:func:`decide_promotion` against the registry's current ``latest``. A ``latest`` whose files cannot be
    loaded (damaged, or replaced: a one-line CheckpointError) is not compared; the decision rests on the bars,
    so models that meet them can replace it."""
    latest = registry.latest_version()
    if latest is None:
        return decide_promotion(run_dir, config, report, None, log=log)
    try:
        champion = registry.resolve(latest)
    except BrvoError as exc:
        decision = decide_promotion(run_dir, config, report, None, log=log)
        decision.champion = latest
        decision.notes.append(f"latest {latest} could not be loaded ({exc}), so it was not compared")
        return decision
    return decide_promotion(run_dir, config, report, champion, log=log)


def _compare(decision: PromotionDecision, run_dir, config: PipelineConfig, report: dict[str, Any],
             champion: RegisteredModels, log: LogFn) -> None:
    """Fill ``decision.comparison`` (or say in its notes why the champion was not compared)."""
    size = champion.config.get("image_size")
    if size is not None and int(size) != config.image_size:
        decision.notes.append(f"latest {champion.version} was trained at {size} px and this run at "
                              f"{config.image_size} px, so they were not compared on the same images")
        return
    try:
        theirs = champion_scores(run_dir, config, champion, log=log)
    except BrvoError as exc:
        decision.notes.append(f"latest {champion.version} could not be scored ({exc}), so it was not compared")
        return
    ours = challenger_scores(report)
    for model, metrics in COMPARED.items():
        if model not in ours:
            continue
        decision.comparison[model] = {key: {"challenger": float(ours[model][key]), "champion": float(theirs[model][key])}
                                      for key, _ in metrics}
        decision.compared_on[model] = (f"{theirs[model]['n']} test images" if model == "pix2pix"
                                       else f"{theirs[model]['n']} held-out cases")


def _worse(decision: PromotionDecision) -> list[str]:
    """One reason per compared score of the challenger below the champion's."""
    out = []
    for model, metrics in COMPARED.items():
        where = "test" if model == "pix2pix" else "held-out"
        on = "test patients" if model == "pix2pix" else "held-out cases"
        for key, name in metrics:
            pair = decision.comparison.get(model, {}).get(key)
            if pair and pair["challenger"] < pair["champion"]:
                out.append(f"{model} {where} {name} {pair['challenger']:.4f} < latest {decision.champion}'s "
                           f"{pair['champion']:.4f} on this run's {on}")
    return out
