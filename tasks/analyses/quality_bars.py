"""The project's quality bars, checked on a run's numbers: what the report, the flow's final state and a
retrain's promotion decide on."""
from __future__ import annotations

from typing import Any

from tasks.analyses.usefulness_protocol import rows_help

BAR_MEANING = {
    "pix2pix_beats_baselines": "Pix2Pix labels must beat every label baseline in Dice and clDice on test patients",
    "crgan_beats_baselines": "CRGAN images must beat nearest-stage copy and neighbour mean in SSIM and PSNR",
    "crgan_patient_specific": "a CRGAN sample must be closer to its own patient than to the others",
    "synthetic_rows_help": "in an arm the learning-curve gate calls measurable, a model trained on real + synthetic "
                           "rows must beat both the same real rows alone and the cheapest same-information "
                           "alternative on real test patients by the usefulness protocol's declared rule, and no "
                           "measurable mix may lose",
}


def bar_checks(report: dict[str, Any]) -> dict[str, bool]:
    """The project's quality bars, checked on this run's numbers (absent sections are left out).

    pix2pix_beats_baselines: higher Dice and clDice than every label baseline of the run (Otsu, Frangi and
    the supervised segmenter) on the test patients;
    crgan_beats_baselines: higher mean SSIM and PSNR than nearest-stage copy and neighbour mean;
    crgan_patient_specific: a sample is more similar to its own patient than to the others;
    synthetic_rows_help: in an arm the learning-curve gate calls measurable, a real + synthetic mix beats real-only
    and the same-information alternative by the protocol's rule, and no measurable mix loses; 'not measurable' and
    'not shown' count as not met, with their reason as a WARNING of their own
    (tasks.analyses.usefulness_protocol.rows_help_status).
    """
    bars: dict[str, bool] = {}
    p2p = report.get("pix2pix") or {}
    if p2p.get("test") and p2p.get("baselines"):
        bars["pix2pix_beats_baselines"] = all(
            p2p["test"][m] > b[m] for b in p2p["baselines"].values() for m in ("dice", "cldice"))
    crg = (report.get("crgan") or {}).get("heldout") or {}
    if crg.get("model") and crg.get("baselines"):
        bars["crgan_beats_baselines"] = all(
            crg["model"][m] > b[m] for b in crg["baselines"].values() for m in ("ssim", "psnr"))
    own = ((report.get("crgan") or {}).get("sample_quality") or {}).get("own_vs_other_ssim") or {}
    if "own" in own and "other" in own:
        bars["crgan_patient_specific"] = bool(own["own"] > own["other"])
    helps = rows_help(report.get("usefulness") or {})
    if helps is not None:
        bars["synthetic_rows_help"] = helps
    return bars
