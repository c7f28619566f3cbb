"""The augment flow: SOUL directory -> RUN_DIR/augmented.h5 + DATASET_CARD.md, report, figures.

    ingest -> preprocess -> train Pix2Pix -> train CRGAN -> fill -> label -> score -> export -> usefulness

Every step is a cached Prefect task keyed on the *contents* of what it reads
(tasks.caching), so a rerun skips finished steps; a step whose outputs were
deleted runs again. Training resumes from its last checkpoint. The whole chain
holds RUN_DIR/.lock, so a second run on the same directory waits, then fails
with a clear message, and never mixes outputs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.locking import run_dir_lock
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths, read_report, update_report
from tasks.caching import content_cache_key, outputs_exist
from tasks.config import PipelineConfig, load_config
from tasks.export import export_task, refresh_documents
from tasks.fill_stages import fill_task
from tasks.ingest import ingest_task
from tasks.label import label_task
from tasks.preprocess import preprocess_task
from tasks.reporting import run_log
from tasks.run_record import record_run
from tasks.score import score_task
from tasks.train_crgan import train_crgan_task
from tasks.train_pix2pix import train_pix2pix_task
from tasks.usefulness import usefulness_task

LOCK_WAIT_S = 5.0


def _cached(task_obj, step: str, inputs: list[str], derived, outputs_present: bool):
    """The task with a content-keyed cache; refreshed when its outputs are gone."""
    return task_obj.with_options(
        cache_key_fn=content_cache_key(step, inputs, derived),
        persist_result=True,
        refresh_cache=not outputs_present,
    )


def augment_chain(soul_dir: str | Path, run_dir: str | Path, config: PipelineConfig, *,
                  registry_dir: str | Path | None = None, model_version: str | None = None,
                  force_retrain: bool = False, lock_wait_s: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Run every step in order under the run-directory lock; return a small summary."""
    soul_dir, run_dir = Path(soul_dir).resolve(), Path(run_dir).resolve()
    paths = RunPaths.of(run_dir)
    timings: dict[str, float] = {}
    cached: list[str] = []

    def timed(name, task_obj, *args, **kwargs):
        t0 = time.perf_counter()
        state = task_obj(*args, return_state=True, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        if state.name == "Cached":
            cached.append(name)
        return state.result()  # re-raises a failed step's error

    with run_dir_lock(run_dir, timeout_s=lock_wait_s):
        record_run(run_dir, config, soul_dir=str(soul_dir))
        soul = lambda p: [RunPaths.of(p["run_dir"]).soul_h5]  # noqa: E731
        timed("ingest", _cached(ingest_task, "ingest", ["source"], None, outputs_exist([paths.manifest])),
              soul_dir, run_dir)
        timed("preprocess", _cached(preprocess_task, "preprocess", [],
                                    lambda p: [RunPaths.of(p["run_dir"]).manifest], outputs_exist([paths.soul_h5])),
              run_dir, config)
        registry = ModelRegistry(registry_dir) if registry_dir else None
        if registry is not None and not force_retrain and (model_version or registry.latest_version()):
            models = registry.resolve(model_version)
            pix2pix_ckpt, crgan_ckpt = models.pix2pix_checkpoint, models.crgan_checkpoint
            for section in ("pix2pix", "crgan"):
                if section in models.metrics:
                    update_report(run_dir, section, {**models.metrics[section], "registry_version": models.version})
            run_log(f"augment: using registry models {models.version} from {models.dir}")
        else:
            p2p_dir, crg_dir = paths.checkpoints("pix2pix"), paths.checkpoints("crgan")
            timed("train_pix2pix", _cached(train_pix2pix_task, "train-pix2pix", [], soul,
                                           outputs_exist([p2p_dir / "best.pt"])), run_dir, config)
            timed("train_crgan", _cached(train_crgan_task, "train-crgan", [], soul,
                                         outputs_exist([crg_dir / "best.pt"])), run_dir, config)
            pix2pix_ckpt, crgan_ckpt = p2p_dir / "best.pt", crg_dir / "best.pt"
        work = paths.synthetic_dir
        timed("fill", fill_task.with_options(refresh_cache=not outputs_exist([work / "synthetic.h5"])),
              run_dir, config, crgan_ckpt)
        timed("label", label_task.with_options(refresh_cache=not outputs_exist([work / "labels.h5"])),
              run_dir, config, pix2pix_ckpt)
        timed("score", score_task.with_options(refresh_cache=not outputs_exist([work / "scores.csv"])),
              run_dir, config, crgan_ckpt)
        exported = timed("export", export_task.with_options(refresh_cache=not outputs_exist([paths.augmented_h5])),
                         run_dir, config, pix2pix_ckpt, crgan_ckpt, str(soul_dir))
        augmented = lambda p: [RunPaths.of(p["run_dir"]).augmented_h5]  # noqa: E731
        timed("usefulness", _cached(usefulness_task, "usefulness", [], augmented, "usefulness" in read_report(run_dir)),
              run_dir, config)
        report = read_report(run_dir)
        update_report(run_dir, "timings_s", _merge_timings(report.get("timings_s") or {}, timings, cached))
        refresh_documents(run_dir, str(soul_dir))
        record_run(run_dir, config, hashes={"augmented.h5": exported.sha256})
        _publish_artifacts(run_dir, read_report(run_dir))
    return {"run_dir": str(run_dir), "augmented_h5": exported.augmented_h5, "n_real": exported.n_real,
            "n_synthetic": exported.n_synthetic, "n_accepted": exported.n_accepted, "timings_s": timings,
            "report": str(paths.report_md), "pix2pix_dice": report.get("pix2pix", {}).get("test", {}).get("dice")}


def _merge_timings(previous: dict[str, Any], now: dict[str, float], cached: list[str]) -> dict[str, Any]:
    """Seconds per step of the run that actually computed it: a step served from the cache keeps
    the time it took when it ran (a rerun would otherwise report zeros); ``cached`` lists them."""
    merged = {name: (previous.get(name, secs) if name in cached else secs) for name, secs in now.items()}
    return {**merged, "total": round(sum(merged.values()), 2), "cached": list(cached)}


def _publish_artifacts(run_dir: Path, report: dict[str, Any]) -> None:
    paths = RunPaths.of(run_dir)
    create_markdown_artifact(key="augment-report", markdown=paths.report_md.read_text(),
                             description=f"brvo-augment report for {run_dir}")
    per_stage = report.get("synthetic", {}).get("per_stage", {})
    create_table_artifact(key="augment-scores", description="synthetic samples per stage",
                          table=[{"stage": k, **v} for k, v in per_stage.items()])
    montages = sorted((paths.figures / "timelines").glob("*.png"))
    create_markdown_artifact(
        key="augment-montages", description="per-patient timeline montages (local files)",
        markdown="\n".join(["# Timeline montages", "", f"{len(montages)} files in `{paths.figures / 'timelines'}`:",
                            ""] + [f"- `{p}`" for p in montages[:60]]))


@flow(name="augment", log_prints=True)
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
    """Fill every patient's missing treatment stages and write the augmented, paired dataset."""
    config = (PipelineConfig.model_validate_json(config_json) if config_json else load_config(preset))
    config = config.with_overrides(seed=seed, image_size=image_size, samples_per_missing=samples_per_missing,
                                   device=device, **{"pix2pix.epochs": pix2pix_epochs,
                                                     "crgan.epochs": crgan_epochs})
    return augment_chain(soul_dir, run_dir, config, registry_dir=registry_dir, model_version=model_version,
                         force_retrain=force_retrain)


def run_augment(soul_dir: Path, run_dir: Path, config: PipelineConfig, **kwargs) -> dict:
    """What `brvo-augment run` calls: the flow, with the whole config as JSON."""
    return augment(soul_dir=str(soul_dir), run_dir=str(run_dir), preset=config.preset,
                   config_json=config.to_json(), **kwargs)


def run_demo(run_dir: Path, preset_name: str = "demo", n_patients: int = 53) -> dict:
    """`make demo`: a phantom SOUL directory beside the run, then the whole flow on it."""
    from tasks.phantom import generate_phantom

    run_dir = Path(run_dir)
    soul_dir = run_dir.parent / f"{run_dir.name}_soul_phantom"
    if not (soul_dir / "S1").exists():
        generate_phantom(soul_dir, n_patients=n_patients, seed=0)
    return run_augment(soul_dir, run_dir, load_config(preset_name))
