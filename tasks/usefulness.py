"""The 'usefulness' step: do the synthetic rows help a model on real test patients?

The protocol (arms, tasks, seeds, the declared rule) is tasks.analyses.usefulness_protocol; the
low-data arms' synthetic rows come from the pipeline's own steps run on a sub-run
(tasks.analyses.usefulness_subsets). docs/usefulness.md has the measurements.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from storage.report_schema import UsefulnessSection
from storage.run_dir import RunPaths
from tasks.analyses.usefulness_subsets import SUBSET_PLAN, PipelineSubsetMaker
from tasks.analyses.usefulness_protocol import (SyntheticMaker, gate_lines, load_study_data, rows_help,
                                                rows_help_status, run_protocol, usage_advice, verdict_lines)
from tasks.config import PipelineConfig
from tasks.engine import Step, StepContext

if TYPE_CHECKING:
    from tasks.export import ExportResult
    from tasks.preprocess import PreprocessResult


def measure_usefulness(run_dir: str | Path, config: PipelineConfig, *, maker: SyntheticMaker | None = None,
                       log: Callable[[str], None] = print, augmented_h5: str | Path | None = None,
                       soul_h5: str | Path | None = None) -> dict[str, Any]:
    """The protocol on a finished run (``augmented_h5`` + ``soul_h5``, default RUN's) with ``config.usefulness``.
    Low-data arms train their generator and labeller in sub-runs under RUN/usefulness/ (cached there by the
    step engine's rules)."""
    paths = RunPaths.of(run_dir)
    data = load_study_data(augmented_h5 if augmented_h5 is not None else paths.augmented_h5,
                           soul_h5 if soul_h5 is not None else paths.soul_h5)
    result = run_protocol(data, config.usefulness, maker=maker or PipelineSubsetMaker(config),
                          work_dir=paths.usefulness_work, log=log, device=config.device,
                          real_only_cache=paths.usefulness_real_only_cache)
    result["verdicts"] = verdict_lines(result)
    result["rows_help"] = rows_help(result)
    result["rows_help_status"] = rows_help_status(result)
    result["advice"] = usage_advice(result)
    for line in gate_lines(result) + result["verdicts"]:
        log(f"usefulness: {line}")
    log(f"usefulness: {result['advice']} ({result['seconds']} s)")
    return result


class UsefulnessResult(BaseModel):
    """The whole protocol result (report.json['usefulness'])."""

    section: dict[str, Any]

    def report_section(self) -> UsefulnessSection:
        return UsefulnessSection.model_validate(self.section)


def usefulness_step(ctx: StepContext, preprocess: PreprocessResult, export: ExportResult) -> UsefulnessResult:
    """The 'usefulness' step: do the synthetic rows help a model on real test patients?"""
    return UsefulnessResult(section=measure_usefulness(ctx.run_dir, ctx.config, log=ctx.log,
                                                       augmented_h5=export.augmented_h5, soul_h5=preprocess.path))


#: Config fields the result depends on: the protocol's own, and (through the low-data arms, whose synthetic rows
#: the sub-run plan makes) those of every step of that plan.
CONFIG_FIELDS = tuple(dict.fromkeys(("seed", "image_size", "device", "usefulness")
                                    + tuple(f for step in SUBSET_PLAN for f in step.config_fields)))

USEFULNESS = Step(
    name="usefulness", run=usefulness_step, result_type=UsefulnessResult, needs=("preprocess", "export"),
    reads=("soul_h5", "augmented_h5"), config_fields=CONFIG_FIELDS,
    report="usefulness",
    description="the usefulness protocol: models trained on real / real + synthetic / synthetic / low-data mixes, "
                "scored on real test patients, paired by seed")
