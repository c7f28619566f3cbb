"""report.json's one schema: a pydantic model per section and :class:`Report` over them, validated when read.

It lives in storage/ because storage reads report.json too (``run_dir.read_report``, and a registry
version keeps its run's pix2pix and crgan sections as metrics.json), and the layering lets every
package above import storage while storage imports none of them. So these models describe data
only: each step's result builds its own section (``report_section()``, tasks.engine.step.Step) and
tasks.rendering.report assembles and renders the :class:`Report`.

The on-disk format is the one the code wrote before the schema existed (same names, same nesting;
../shared/DESIGN.md section 9): sections and their fields are optional, so a report of an older run
or of a partial run (a single step) loads, and a dump leaves out what was never set. Sections
forbid keys they do not declare, so a new number is added here first. Deliberate exceptions:
records that another module's own type describes and that grow with it (a model's training
result, a checkpoint or baseline's parameters, the calibration provenance) are open, and so are
the parts of the usefulness protocol that are still growing (see :class:`UsefulnessSection`).

A number that was not measured is NaN in memory and ``null`` on disk: report.json is strict JSON.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from storage.errors import BrvoError

#: A measured number; None where a report says "not measured" (NaN before the schema wrote null).
Number = float | None


class Section(BaseModel):
    """A report part with a fixed set of keys: an undeclared key is an error, not a silent extra."""

    model_config = ConfigDict(extra="forbid")


class OpenRecord(BaseModel):
    """A record another module's own type describes (it grows with that type): the keys read here are typed,
    the others are kept as they are."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------- scores


class LabelScores(Section):
    """A labeller's scores on test images (brvo_models.metrics)."""

    dice: Number = None
    iou: Number = None
    cldice: Number = None
    mse: Number = None
    ssim: Number = None
    cosine: Number = None
    n: int | None = None


class ImageScores(Section):
    """An image generator's (or an image baseline's) scores against real images."""

    mse: Number = None
    psnr: Number = None
    ssim: Number = None
    cosine: Number = None
    n: int | None = None


class CheckpointRef(OpenRecord):
    path: str | None = None
    sha256: str | None = None
    step: int | None = None
    epoch: Number = None


# ---------------------------------------------------------------------------------------- pix2pix


class SegmenterParams(OpenRecord):
    """How the supervised-segmenter baseline was made (tasks.shared.label_baselines.segmenter_baseline)."""

    arch: str | None = None
    steps: int | None = None
    best_step: int | None = None
    threshold: Number = None
    flip_averaged_test: LabelScores | None = None


class Pix2PixSection(Section):
    """report.json 'pix2pix': test-patient scores against the label baselines, threshold, objective, training
    (tasks.pix2pix.evaluate_pix2pix, plus tasks.shared.trained_model.TrainedModel's origin and training)."""

    test: LabelScores | None = None
    baselines: dict[str, LabelScores] = {}
    n_test_patients: int | None = None
    image_size: int | None = None
    threshold: Number = None
    threshold_source: str | None = None
    objective: str | None = None
    flip_average: bool | None = None
    checkpoint: CheckpointRef | None = None
    frangi_params: dict[str, Any] | None = None
    segmenter_params: SegmenterParams | None = None
    metric_notes: str | None = None
    paper_context: dict[str, Any] | None = None
    seconds: Number = None
    registry_version: str | None = None
    #: the training result (brvo_models' fit result, its history left out): its own type describes it
    training: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------- crgan


class StageHeldout(Section):
    n: int | None = None
    model: ImageScores | None = None
    nearest: ImageScores | None = None
    neighbour_mean: ImageScores | None = None


class GapCourse(Section):
    """The course a kind of gap's estimates carry (brvo_models.heldout_gaps)."""

    real_change_mean: Number = None
    model_change_mean: Number = None
    carried: Number = None
    offset: Number = None


class GapHeldout(StageHeldout):
    n_patients: int | None = None
    course: GapCourse | None = None


class TestOnlyHeldout(StageHeldout):
    model_single_sample: ImageScores | None = None


class CrganHeldout(Section):
    """Held-out real stages of val + test patients, hidden and regenerated, against the image baselines."""

    n: int | None = None
    n_patients: int | None = None
    n_real_images: int | None = None
    model: ImageScores | None = None
    model_single_sample: ImageScores | None = None
    baselines: dict[str, ImageScores] = {}
    per_stage: dict[str, StageHeldout] = {}
    per_gap: dict[str, GapHeldout] | None = None
    test_only: TestOnlyHeldout | None = None
    k_samples: int | None = None
    sample_seeds: list[int] | None = None
    metric_notes: str | None = None


class OwnVsOther(Section):
    own: Number = None
    other: Number = None
    n_cases: int | None = None


class SampleQuality(Section):
    diversity: Number = None
    diversity_pixel_std: Number = None
    own_vs_other_ssim: OwnVsOther | None = None
    notes: str | None = None


class CrganSection(Section):
    """report.json 'crgan': held-out scores, baselines, per stage and gap kind, sample quality, training
    (tasks.crgan.evaluate_crgan, plus TrainedModel's origin and training)."""

    heldout: CrganHeldout | None = None
    sample_quality: SampleQuality | None = None
    image_size: int | None = None
    checkpoint: CheckpointRef | None = None
    seconds: Number = None
    registry_version: str | None = None
    #: the training result, as in :class:`Pix2PixSection`
    training: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------- synthetic


class StageCounts(Section):
    real: int = 0
    synthetic: int = 0
    accepted: int = 0


class ScoreSummary(Section):
    mean: Number = None
    p10: Number = None
    p90: Number = None


class Calibration(OpenRecord):
    """Where calibrated thresholds came from (tasks.score.calibrated_thresholds), or why they fell back."""

    split: str | None = None
    patients: int | None = None
    rows: int | None = None
    quantile: Number = None
    real_pass_rate: Number = None
    fallback_reason: str | None = None


class Thresholds(Section):
    """The acceptance bounds the score step used (tasks.score.AcceptanceThresholds, as written)."""

    min_consistency_ssim: float
    min_realism: float
    max_abs_density_z: float
    min_label_confidence: float
    source: str
    calibration: Calibration = Calibration()
    min_label_density: Number = None
    max_label_density: Number = None
    label_density_source: str | None = None


class DensityPair(Section):
    real: Number = None
    synthetic: Number = None


class StageTrend(Section):
    """Does the treatment effect survive in the synthetic rows? (tasks.analyses.stage_trend)."""

    synthetic_rows: str | None = None
    n_real_pairs: int | None = None
    n_synthetic_stages: int | None = None
    real_slope_per_stage: Number = None
    real_slope_se: Number = None
    real_effect_present: bool | None = None
    synthetic_slope_per_stage: Number = None
    synthetic_bias: Number = None
    effect_share: Number = None
    flat: bool | None = None
    offset: bool | None = None
    per_stage_density: dict[str, DensityPair] = {}
    rule: str | None = None


class SyntheticSection(Section):
    """report.json 'synthetic' (the export step): counts, score summaries, thresholds, rejections, trend."""

    n: int = 0
    accepted: int = 0
    per_stage: dict[str, StageCounts] = {}
    scores: dict[str, ScoreSummary] = {}
    thresholds: Thresholds | None = None
    rejected_by: dict[str, int] = {}
    degenerate_labels: int | None = None
    degenerate_by: dict[str, int] = {}
    mean_label_density: Number = None
    stage_trend: StageTrend | None = None


# ---------------------------------------------------------------------------------------- the others


class FiguresSection(RootModel[list[str]]):
    """report.json 'figures': the paths of the run's figures."""


class StageQuality(Section):
    """KID and precision / recall / density / coverage of one stage (brvo_models.image_quality.stage_quality)."""

    n_real: int | None = None
    n_synthetic: int | None = None
    kid_mean: Number = None
    kid_std: Number = None
    precision: Number = None
    recall: Number = None
    density: Number = None
    coverage: Number = None
    kid_subset_size: int | None = None
    kid_subsets: int | None = None
    nearest_k: int | None = None
    reason: str | None = None
    baseline: StageQuality | None = None


class ImageQualitySection(Section):
    """report.json 'image_quality': per feature extractor, per stage (and 'all')."""

    synthetic_rows: str
    n_synthetic: int
    n_held_out_real: int
    n_train_real: int
    extractors: dict[str, dict[str, StageQuality]]
    seconds: Number = None


class UsefulnessComparison(BaseModel):
    """One paired comparison of the usefulness protocol: an arm against its baseline on one task's metric.

    Extra keys are allowed on purpose: the protocol is still growing (more comparison fields); the keys
    typed here are the ones the verdicts, the bars and the report read. ``verdict`` is free text for the
    same reason (new verdict words such as 'not enough seeds')."""

    model_config = ConfigDict(extra="allow")

    arm: str
    baseline: str
    task: str
    metric: str
    per_seed_gain: list[Number] = []
    mean_gain: Number = None
    se: Number = None
    t_crit: Number = None
    n: int | None = None
    verdict: str
    #: what may be claimed is ``verdict``; ``rule_verdict`` is the paired rule's own before the learning-curve gate
    rule_verdict: str | None = None
    baseline_role: str = "real_only"  # or "same_information_alternative" (self-training, interpolation)
    group: str | None = None  # the gated group of arms: "full_data", "low_data_25", ...
    adds_synthetic: bool | None = None
    gate: dict[str, Any] | None = None  # the gate's entry for the group and task: measurable, reason, gain, SE


class UsefulnessArm(BaseModel):
    """One arm of the protocol; its per-task scores are the protocol's own (open on purpose, growing)."""

    model_config = ConfigDict(extra="allow")

    n_rows: list[Number] = []
    n_synthetic_rows: list[Number] = []
    n_patients: list[Number] = []
    tasks: dict[str, dict[str, Any]] = {}


class UsefulnessSection(BaseModel):
    """report.json 'usefulness': tasks.analyses.usefulness_protocol.run_protocol's result plus the step's
    verdict lines, rows_help and advice.

    The stable top level and the comparison rows are typed. Extra keys are allowed here, in the arms and in
    the comparisons on purpose: the protocol is being extended (a learning-curve gate, new verdict words,
    more comparison fields), and a new key there must not make every run's report fail to load."""

    model_config = ConfigDict(extra="allow")

    rule: str | None = None
    alpha: Number = None
    eval_split: str | None = None
    seeds: list[int] = []
    config: dict[str, Any] = {}
    patients: dict[str, int] = {}
    arms: dict[str, UsefulnessArm] = {}
    comparisons: list[UsefulnessComparison] = []
    skipped_arms: dict[str, str] = {}
    agreement_selection: dict[str, Any] = {}
    references: dict[str, Any] = {}
    synthetic_maker_seconds: dict[str, Any] = {}
    seconds: Number = None
    cpu_seconds: Number = None
    verdicts: list[str] = []
    rows_help: bool | None = None
    rows_help_status: dict[str, str] | None = None  # the bar: status (met / missed / not shown / not measurable), reason
    gate: dict[str, Any] | None = None  # the learning-curve gate: the real-only curve, measurable groups, saturation
    generators: str | None = None  # which trained generators the verdicts rest on
    advice: str | None = None


class Timings(BaseModel):
    """report.json 'timings_s': seconds per step (of the run that computed it), the total, the cached steps."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float]

    total: Number = None
    cached: list[str] = []


class Report(Section):
    """report.json: one optional field per section a step fills (Step.report names it), then the run's
    timings, config, versions and quality bars. A step that declares a section not named here fails
    when the report is built, so no section is untyped."""

    pix2pix: Pix2PixSection | None = None
    crgan: CrganSection | None = None
    synthetic: SyntheticSection | None = None
    figures: FiguresSection | None = None
    image_quality: ImageQualitySection | None = None
    usefulness: UsefulnessSection | None = None
    timings_s: Timings | None = None
    #: tasks.config.PipelineConfig as dumped (its own type validates it; a report keeps the fields of its day)
    config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    bars: dict[str, bool] | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as report.json holds it: the sections that were set, NaN as null."""
        return without_nan(self.model_dump(mode="json", exclude_unset=True))


def without_nan(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def report_text(report: Report) -> str:
    """report.json's text: strict JSON (no NaN), indented as before."""
    return json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def load_report(path: str | os.PathLike) -> Report:
    """Read and validate report.json; a missing, unreadable or invalid file is a one-line BrvoError naming the
    file and the first bad field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrvoError(f"{path}: no report (run the flow that writes it)") from None
    except (OSError, ValueError) as exc:
        raise BrvoError(f"{path}: not a readable report.json ({' '.join(str(exc).split())})") from None
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BrvoError(f"{path}: invalid report.json at {_where(first)}: {first['msg']}{more}") from None
