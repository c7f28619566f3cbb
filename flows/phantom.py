"""The 'phantom' command: write the built-in SOUL phantom (``brvo_models.phantom``) into a directory.

Not a pipeline step: it makes an input directory, not part of a run directory. The generator, its
knobs and the figure live in ``brvo_models/phantom/``; this module chooses how many processes render
patients and wraps the call in a Prefect task.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from brvo_models.phantom import PhantomConfig, PhantomSummary, phantom_config, write_phantom
from brvo_models.phantom.soul_writer import check_target
from brvo_models.phantom.truth import check_truth_target, write_truth
from storage.errors import BrvoError
from tasks.shared.workers import process_map

__all__ = ["PhantomConfig", "PhantomSummary", "generate_phantom", "phantom_task", "preflight_phantom"]


def _patient_map(workers: int, log: Callable[[str], None]):
    """Run patient jobs in ``workers`` processes (in this one when 1); results in job order."""
    def run(fn: Callable, jobs: Iterable) -> list:
        jobs = list(jobs)
        n = max(1, min(workers, len(jobs)))
        log(f"phantom: {len(jobs)} patients on {n} process(es)")
        with process_map(n) as patient_map:
            return list(patient_map(fn, jobs))
    return run


def preflight_phantom(out_dir: Path, workers: int = 2, overwrite: bool = False, truth_dir: Path | None = None) -> None:
    """Cheap checks before any work (and before Prefect starts): a one-line BrvoError when the request cannot run."""
    if workers < 1:
        raise BrvoError(f"workers must be at least 1 (got {workers})")
    check_target(Path(out_dir), overwrite)
    if truth_dir is not None:
        check_truth_target(Path(truth_dir), overwrite, soul_dir=Path(out_dir))


def generate_phantom(out_dir: Path, config: PhantomConfig | None = None, *, n_patients: int | None = None,
                     seed: int | None = None, image_size: int | None = None, workers: int = 2,
                     overwrite: bool = False, log: Callable[[str], None] | None = None,
                     truth_dir: Path | None = None) -> PhantomSummary:
    """Write the phantom ``config`` describes (default: the demo's 53 patients) into ``out_dir``.

    ``n_patients``, ``seed`` and ``image_size``, when given, replace the config's. The
    bytes depend on the config only, not on ``workers``. ``overwrite`` replaces an
    existing phantom (a directory holding only S1-S3 and the sheet); anything else there
    is refused. A bad value is a one-line BrvoError.

    ``truth_dir``, when given, also receives the truth of the visits the patients missed
    (:mod:`brvo_models.phantom.truth`), outside the tree; the tree's bytes are the same with or
    without it. Only an evaluation reads it, never a pipeline step.
    """
    config = phantom_config(config, n_patients=n_patients, seed=seed, image_size=image_size)
    preflight_phantom(out_dir, workers, overwrite, truth_dir)
    log = log or (lambda _msg: None)
    summary = write_phantom(Path(out_dir), config, overwrite=overwrite, map_patients=_patient_map(workers, log),
                            log=log)
    if truth_dir is not None:
        write_truth(Path(truth_dir), config, overwrite=overwrite, soul_dir=Path(out_dir),
                    map_patients=_patient_map(workers, log), log=log)
    return summary


def _phantom_step(out_dir: Path, config: PhantomConfig | None = None, n_patients: int | None = None,
                  seed: int | None = None, image_size: int | None = None, workers: int = 2,
                  overwrite: bool = False, truth_dir: Path | None = None) -> PhantomSummary:
    from tasks.engine.logs import run_log

    return generate_phantom(out_dir, config, n_patients=n_patients, seed=seed, image_size=image_size,
                            workers=workers, overwrite=overwrite, log=run_log, truth_dir=truth_dir)


def _make_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    # writing a directory is a side effect: never skip it because the inputs look the same
    return task(name="phantom", cache_policy=NO_CACHE)(_phantom_step)


phantom_task = _make_task()
