"""The augment flow: SOUL directory -> RUN_DIR/augmented.h5 + DATASET_CARD.md, report, figures.

    ingest -> preprocess -> pix2pix, crgan (trained here, or a registry version)
    -> fill -> label -> score -> export -> figures, usefulness -> report.json, report.md, card

The plan is a tuple of steps from the step table (tasks.engine); :func:`tasks.engine.run_plan`
serves each step from its record when nothing it depends on changed (inputs' contents,
config fields, code) and its outputs are intact, else runs it; training resumes from its last
checkpoint. The documents are rebuilt from the step results at the end of every run. The
whole chain holds RUN_DIR/.lock, so a second run on the same directory waits, then fails
with a clear message, and never mixes outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.run_steps import LOCK_WAIT_S, run_steps
from tasks.engine.concurrency import step_task_runner
from tasks.rendering.artifacts import publish_augment_artifacts
from flows.final_state import final_state, outcome_state, summary_line
from flows.settings import registry_dir_setting
from storage.errors import BrvoError
from storage.registry import ModelRegistry, RegisteredModels
from storage.report_schema import load_report
from storage.run_dir import RunPaths
from tasks.config import PipelineConfig, config_from, load_config
from flows.plans import AUGMENT
from tasks.shared.trained_model import ModelName, TrainedModel
from tasks.rendering.report import bars_summary, warnings_of
from tasks.engine.logs import in_prefect_run, install_one_line_errors, run_warning
from tasks.engine import Executor, PlanRun, Step, StepContext, execute_with_prefect


__all__ = ["AUGMENT", "augment", "augment_chain", "augment_plan", "run_augment", "run_demo"]


# ----------------------------------------------------------------------------------- registry


def resolve_registry(registry_dir: str | Path | None, model_version: str | None,
                     force_retrain: bool) -> RegisteredModels | None:
    """The registry version a run should use, or None when it trains its own models.

    None when there is no registry, when ``force_retrain``, or when the registry has no
    promoted version yet and none was pinned (a WARNING says so when versions exist but none was
    promoted; a pinned version that does not exist, or a broken 'latest' pointer, is an error).
    """
    if not registry_dir or force_retrain:
        return None
    registry = ModelRegistry(registry_dir)
    if model_version is None and registry.latest_version() is None:
        note = registry.unpromoted_note()
        if note:
            run_warning(note)
        return None
    return registry.resolve(model_version)


def check_registry_fits(models: RegisteredModels, config: PipelineConfig) -> None:
    """Refuse, before any work, a registry version trained at another image size or label rule than the run's."""
    size = models.config.get("image_size")
    if size is not None and int(size) != config.image_size:
        raise BrvoError(
            f"registry version {models.version} was trained at {size} px but this run asks for "
            f"{config.image_size} px; pass image_size={size}, pin another version (model_version=...) "
            f"or set force_retrain to train new models")
    rule = models.config.get("label_resize", "nearest")  # versions published before the option: nearest
    if rule != config.label_resize:
        raise BrvoError(
            f"registry version {models.version} was trained on labels resized by {rule!r} but this run resizes "
            f"them by {config.label_resize!r}; its Pix2Pix would label synthetic rows unlike the real ones. Pass "
            f"label_resize={rule!r}, pin another version (model_version=...) or set force_retrain")


def registry_step(model: ModelName, models: RegisteredModels) -> Step:
    """A step that provides ``model`` from a registry version instead of training it."""

    def use_registry_model(ctx: StepContext) -> TrainedModel:
        path = models.pix2pix_checkpoint if model == "pix2pix" else models.crgan_checkpoint
        ctx.log(f"{model}: using registry version {models.version} ({path})")
        return TrainedModel(model=model, checkpoint=str(path), sha256=models.sha256s.get(f"{model}.pt", ""),
                            image_size=int(models.config.get("image_size", 0)), registry_version=models.version,
                            evaluation=dict(models.metrics.get(model) or {}))

    return Step(name=model, run=use_registry_model, result_type=TrainedModel, cache=False, report=model,
                description=f"{model} model from the registry ({models.version})")


def augment_plan(models: RegisteredModels | None = None) -> tuple[Step, ...]:
    """AUGMENT, with the two training steps replaced by registry models when ``models`` is given."""
    if models is None:
        return AUGMENT
    swap = {"pix2pix": registry_step("pix2pix", models), "crgan": registry_step("crgan", models)}
    return tuple(swap.get(step.name, step) for step in AUGMENT)


# ----------------------------------------------------------------------------------- the chain


def augment_chain(soul_dir: str | Path, run_dir: str | Path, config: PipelineConfig, *,
                  registry_dir: str | Path | None = None, model_version: str | None = None,
                  force_retrain: bool = False, lock_wait_s: float = LOCK_WAIT_S,
                  execute: Executor = execute_with_prefect) -> dict[str, Any]:
    """Run the augment plan under the run-directory lock; return a small summary."""
    install_one_line_errors()
    soul_dir, run_dir = Path(soul_dir).resolve(), Path(run_dir).resolve()
    models = resolve_registry(registry_dir, model_version, force_retrain)
    if models is not None:
        check_registry_fits(models, config)  # before any work
    run = run_steps(augment_plan(models), run_dir, config, source=soul_dir, execute=execute,
                    lock_wait_s=lock_wait_s)
    summary = _summary(run_dir, run, run.report)
    summary["outcome"] = summary_line(outcome_state(summary["bars"], summary["warnings"]), summary["report"])
    if in_prefect_run():
        publish_augment_artifacts(run_dir, run.report, summary)
    return summary


def _summary(run_dir: Path, run: PlanRun, report: dict[str, Any]) -> dict[str, Any]:
    exported = run.result("export")
    typed = load_report(RunPaths.of(run_dir).report_json)  # the file just written, validated as any reader does
    test = typed.pix2pix.test if typed.pix2pix else None
    return {"run_dir": str(run_dir), "augmented_h5": exported.augmented_h5, "n_real": exported.n_real,
            "n_synthetic": exported.n_synthetic, "n_accepted": exported.n_accepted,
            "timings_s": typed.timings_s.model_dump(exclude_unset=True) if typed.timings_s else {},
            "report": str(RunPaths.of(run_dir).report_md), "pix2pix_dice": test.dice if test else None,
            "bars": typed.bars or {}, "bars_summary": bars_summary(report), "warnings": warnings_of(report)}


@flow(name="augment", log_prints=True, task_runner=step_task_runner())
def augment(
    soul_dir: str,
    run_dir: str,
    preset: str = "demo",
    seed: int | None = None,
    image_size: int | None = None,
    samples_per_missing: int | None = None,
    pix2pix_epochs: int | None = None,
    crgan_epochs: int | None = None,
    device: str | None = None,
    config_json: str | None = None,
    registry_dir: str | None = None,
    model_version: str | None = None,
    force_retrain: bool = False,
) -> dict:
    """Fill every patient's missing treatment stages and write the augmented, paired dataset.

    ``registry_dir`` defaults to $BRVO_REGISTRY_DIR where the flow runs (serve or a work-pool
    worker): when it holds published models, they are used instead of training.
    """
    config = config_from(preset, config_json, seed=seed, image_size=image_size,
                         samples_per_missing=samples_per_missing, device=device,
                         **{"pix2pix.epochs": pix2pix_epochs, "crgan.epochs": crgan_epochs})
    summary = augment_chain(soul_dir, run_dir, config, registry_dir=registry_dir_setting(registry_dir),
                            model_version=model_version, force_retrain=force_retrain)
    # the run's final state says how it went: green 'Completed' alone must not hide a missed bar
    return final_state(summary["bars"], summary["warnings"], where=summary["report"], data=summary)


def run_augment(soul_dir: Path, run_dir: Path, config: PipelineConfig, **kwargs) -> dict:
    """What `brvo-augment run` calls: the flow, with the whole config as JSON."""
    return augment(soul_dir=str(soul_dir), run_dir=str(run_dir), preset=config.preset,
                   config_json=config.to_json(), **kwargs)


def run_demo(run_dir: Path, preset_name: str = "demo", n_patients: int = 53) -> dict:
    """`make demo`: a phantom SOUL directory beside the run, then the whole flow on it."""
    from flows.phantom import generate_phantom

    run_dir = Path(run_dir)
    soul_dir = run_dir.parent / f"{run_dir.name}_soul_phantom"
    if not (soul_dir / "S1").exists():
        generate_phantom(soul_dir, n_patients=n_patients, seed=0)
    return run_augment(soul_dir, run_dir, load_config(preset_name))
