"""The 'retrain' flow: when the SOUL data or the config changed, retrain both models into the model registry.

Scheduled weekly by ``brvo-augment serve``. An unchanged source (its content fingerprint) and config
is a quick 'no change'; otherwise ingest -> preprocess -> pix2pix -> crgan run in a resumable work
directory and the models are published as a new version, which becomes ``latest`` only when it wins
(tasks/analyses/promotion.py). REGISTRY/last_retrain.json records every run. Details: docs/steps.md.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.client.schemas.objects import State

from flows.final_state import final_state

from flows.settings import (
    ENV_REGISTRY_DIR,
    ENV_SOUL_DIR,
    registry_dir_setting,
    soul_dir_setting,
)
from storage.atomic import write_json_atomic
from storage.errors import BrvoError
from storage.fingerprint import SourceFingerprint, fingerprint_source
from storage.hashing import json_sha256
from storage.locking import file_lock
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths
from tasks.engine.concurrency import step_task_runner
from tasks.config import PipelineConfig, config_from
from tasks.shared.preflight import preflight_registry
from tasks.engine.logs import in_prefect_run, run_log, run_warning

if TYPE_CHECKING:
    from tasks.engine import PlanRun, Step

FINGERPRINT_CACHE = ".fingerprint_cache.json"
STATUS_FILE = "last_retrain.json"
REGISTRY_LOCK_WAIT_S = 10.0  # for another retrain of the same registry


def retrain_plan() -> tuple[Step, ...]:
    """ingest -> preprocess -> pix2pix, crgan: the steps a retrain runs in its work directory (imported on
    call: the step modules bring torch, which a retrain with nothing to do never needs)."""
    from flows.plans import RETRAIN

    return RETRAIN


def resolve_dirs(soul_dir: str | None, registry_dir: str | None) -> tuple[Path, Path]:
    """Explicit parameters, else the BRVO_SOUL_DIR / BRVO_REGISTRY_DIR environment variables."""
    soul = soul_dir_setting(soul_dir)
    registry = registry_dir_setting(registry_dir)
    if not soul:
        raise BrvoError(f"no SOUL directory: pass soul_dir or set {ENV_SOUL_DIR} where the flow runs")
    if not registry:
        raise BrvoError(f"no model registry: pass registry_dir or set {ENV_REGISTRY_DIR} where the flow runs")
    return Path(soul).expanduser(), Path(registry).expanduser()


def make_config(preset: str = "demo", config_json: str | None = None) -> PipelineConfig:
    """The preset, with the fields of ``config_json`` (a whole config or a partial one) on top
    (tasks.config.config_from, as every entry point)."""
    return config_from(preset, config_json)


def config_fingerprint(config: PipelineConfig) -> str:
    """Stable hash of the whole config (a changed preset or field means new models)."""
    return json_sha256(config)


def source_fingerprint(soul_dir: Path, registry_dir: Path) -> SourceFingerprint:
    return fingerprint_source(soul_dir, cache_path=registry_dir / FINGERPRINT_CACHE)


def is_unchanged(registry: ModelRegistry, fingerprint: SourceFingerprint, cfg_hash: str) -> bool:
    """True when the newest version (promoted or not) was trained on this exact source content and config."""
    last = registry.source_of(registry.newest_version())
    return bool(last) and last.get("digest") == fingerprint.digest and last.get("config_hash") == cfg_hash


fingerprint_task = task(name="fingerprint-source", retries=1, retry_delay_seconds=2)(source_fingerprint)


@task(name="decide-promotion")
def promotion_task(run: PlanRun, work: Path, config: PipelineConfig, registry_dir: Path) -> dict[str, Any]:
    """Champion and challenger: the new models' bars, and the current latest scored on this run's held-out data."""
    from tasks.analyses.promotion import decide_against_latest

    decision = decide_against_latest(work, config, run.report, ModelRegistry(registry_dir))
    run_log(f"promotion: {'promote' if decision.promote else 'do not promote'}: {decision.summary()}")
    return decision.record()


@task(name="publish-models")
def publish_task(run: PlanRun, work: Path, registry_dir: Path, config: PipelineConfig, source: dict[str, Any],
                 promotion: dict[str, Any]) -> str:
    """Copy the two trained checkpoints, their evaluations, the run's report and the promotion decision into a
    new registry version; latest moves only when the decision holds."""
    models = {name: run.result(name) for name in ("pix2pix", "crgan")}
    documents = RunPaths.of(work)
    registry = ModelRegistry(registry_dir)
    version = registry.publish(
        {name: m.checkpoint_path for name, m in models.items()}, config, source,
        metrics={name: m.report_section().model_dump(mode="json", exclude_unset=True) for name, m in models.items()},
        promotion=promotion,
        documents={"report.json": documents.report_json, "report.md": documents.report_md})
    promoted = registry.latest_version() == version
    run_log(f"published models {version} to {registry_dir} "
            + (f"(latest -> {version})" if promoted else "(not promoted)"))
    return version


@flow(name="retrain", log_prints=True, task_runner=step_task_runner())
def retrain(
    soul_dir: str | None = None,
    registry_dir: str | None = None,
    preset: str = "demo",
    config_json: str | None = None,
    work_dir: str | None = None,
    force: bool = False,
    keep_work: bool = False,
) -> dict:
    """Retrain Pix2Pix and CRGAN on ``soul_dir`` into ``registry_dir`` if the data or config changed.

    soul_dir / registry_dir default to $BRVO_SOUL_DIR / $BRVO_REGISTRY_DIR. ``force`` retrains
    even when nothing changed; ``keep_work`` keeps the work directory (soul.h5, checkpoints,
    report.json) after a successful publish (default: removed, the registry holds what matters).
    The run's final state message says what happened: 'retrained: latest -> v0004-... (was v0003-...); ...',
    'published v0004-..., not promoted: 2 bars missed (...)' or 'no change since ...'.
    """
    result = retrain_chain(soul_dir, registry_dir, make_config(preset, config_json), work_dir, force, keep_work)
    return retrain_final_state(result)


def retrain_final_state(result: dict[str, Any]) -> State:
    """The retrain's final state, named for what the runs list must show (flows.final_state): a version
    published without promotion is 'Completed: not promoted, 2 bars missed' (or 'Completed: not
    promoted' when it scored below latest), never the plain 'Completed' of a promotion or of 'no change'.
    The message is the result's own (it says why), with the WARNING count; the summary line names the
    version's report.md."""
    if result.get("status") not in ("retrained", "published"):  # 'no change': nothing was measured
        return final_state({}, [], lead=result["message"], data=result)
    return final_state((result.get("promotion") or {}).get("bars") or {}, result.get("warnings") or [],
                       lead=result["message"], verdict="" if result.get("promoted") else "not promoted",
                       where=str(Path(result["registry_dir"]) / "models" / result["version"] / "report.md"),
                       data=result)


def retrain_chain(soul_dir: str | None, registry_dir: str | None, config: PipelineConfig,
                  work_dir: str | None, force: bool, keep_work: bool) -> dict:
    """The retrain flow's body (see :func:`retrain`)."""
    from tasks.engine.logs import install_one_line_errors
    from tasks.ingest import check_source

    install_one_line_errors()
    t0 = time.perf_counter()
    soul, reg_dir = resolve_dirs(soul_dir, registry_dir)
    check_source(soul)
    preflight_registry(reg_dir)  # before the fingerprint (cached in the registry), ingest and preprocess
    cfg_hash = config_fingerprint(config)
    registry = ModelRegistry(reg_dir)

    fp = fingerprint_task(soul, reg_dir)
    run_log(f"source {soul}: {fp.n_files} files, {fp.total_bytes / 1e6:.1f} MB, fingerprint {fp.digest[:12]} "
            f"({fp.hashed} hashed, {fp.reused} from cache)")
    base = {"soul_dir": str(soul), "registry_dir": str(reg_dir), "fingerprint": fp.digest,
            "n_files": fp.n_files, "config_hash": cfg_hash}
    if not force and is_unchanged(registry, fp, cfg_hash):
        return _no_change(registry, t0, base, "")

    busy = f"model registry {reg_dir} is being retrained by another run (pid {{pid}}); wait for it to finish"
    with file_lock(reg_dir / ".retrain.lock", REGISTRY_LOCK_WAIT_S, busy):
        fp = source_fingerprint(soul, reg_dir)  # the data may have moved on while we waited
        if not force and is_unchanged(registry, fp, cfg_hash):
            return _no_change(registry, t0, {**base, "fingerprint": fp.digest}, " (published while waiting)")
        from flows.run_steps import run_steps  # torch: imported only when there is work to do

        work = Path(work_dir) if work_dir else reg_dir / "work" / f"{fp.digest[:12]}-{cfg_hash[:8]}"
        run_log(f"retraining in {work} (latest: {registry.latest_version() or 'none'})")
        try:
            run = run_steps(retrain_plan(), work, config, source=soul,
                            log_warnings=False)  # logged below, naming the version's report: work is deleted
            t = time.perf_counter()
            previous = registry.latest_version()
            decision = promotion_task(run, work, config, reg_dir)
            version = publish_task(run, work, reg_dir, config, {**fp.to_dict(), "config_hash": cfg_hash,
                                                                 "soul_dir": str(soul)}, decision)
            timings = {**run.timings(), "publish": round(time.perf_counter() - t, 2)}
            if not keep_work and not work_dir:
                shutil.rmtree(work, ignore_errors=True)
            published = registry.resolve(version)
            promotion = published.promotion
            warnings = _warn(run.report, published.dir, version, promotion, previous)
            status = "retrained" if promotion["promoted"] else "published"
            result = {**base, "fingerprint": fp.digest, "status": status, "version": version,
                      "promoted": bool(promotion["promoted"]), "previous_version": previous,
                      "latest": registry.latest_version(), "promotion": promotion, "scores": _scores(run.report),
                      "metrics": _headline(published.metrics), "warnings": warnings, "timings_s": timings}
            message = (f"retrained: latest -> {version} (was {previous or 'none'}); {promotion['summary']}"
                       if promotion["promoted"] else f"published {version}, not promoted: {promotion['summary']}")
            return _finish(registry, t0, result, message)
        except Exception as exc:
            _finish(registry, t0, {**base, "status": "failed", "work_dir": str(work),
                                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"},
                    f"failed; latest stays {registry.latest_version() or 'none'}, rerun to resume from {work}")
            raise


def _no_change(registry: ModelRegistry, t0: float, base: dict[str, Any], when: str) -> dict[str, Any]:
    """The quick result: the newest version was trained on this data and config (and was promoted or not)."""
    newest, latest = registry.newest_version(), registry.latest_version()
    promotion = registry.promotion_of(newest) if newest != latest else {}
    result = {**base, "status": "no change", "version": newest, "latest": latest, "promoted": newest == latest}
    if newest == latest:
        return _finish(registry, t0, result, f"no change since {newest}{when}: nothing to retrain")
    why = promotion.get("summary") or "no decision recorded"
    return _finish(registry, t0, {**result, "promotion": promotion},
                   f"no change since {newest} (not promoted: {why}; latest stays {latest or 'none'}){when}: "
                   f"nothing to retrain")


def _warn(report: dict[str, Any], version_dir: Path, version: str, promotion: dict[str, Any],
          previous: str | None) -> list[str]:
    """Log the run's WARNINGs, naming the published report (the work directory is gone), and a version that
    was not promoted; return them."""
    from tasks.rendering.report import warnings_of

    lines = [f"{w}; see {version_dir / 'report.md'}" for w in warnings_of(report)]
    if not promotion.get("promoted"):
        kept = (f"latest stays {previous} (augment runs keep using it)" if previous else
                "no version is latest yet (augment runs train their own models)")
        lines.append(f"published {version}, not promoted: {promotion.get('summary')}; {kept}; "
                     f"see {version_dir / 'promotion.json'}")
    for line in lines:
        run_warning(line)
    return lines


def _finish(registry: ModelRegistry, t0: float, result: dict[str, Any], message: str) -> dict[str, Any]:
    """Record the outcome (REGISTRY/last_retrain.json, the 'retrain-result' artifact, the log) and return it."""
    from tasks.rendering.artifacts import publish_retrain_artifact

    result["message"] = message
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(registry.root / STATUS_FILE, result)
    run_log(f"retrain: {message} ({result['seconds']} s)")
    if in_prefect_run():
        publish_retrain_artifact(result)
    return result


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A few numbers for the run's result (the full sections stay in the registry's metrics.json)."""
    out: dict[str, Any] = {}
    test = metrics.get("pix2pix", {}).get("test", {})
    for key in ("dice", "cldice"):
        if isinstance(test, dict) and key in test:
            out[f"pix2pix_{key}"] = test[key]
    model = metrics.get("crgan", {}).get("heldout", {}).get("model", {})
    for key in ("ssim", "psnr"):
        if isinstance(model, dict) and key in model:
            out[f"crgan_{key}"] = model[key]
    return out


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    """Each model's held-out scores beside its baselines, as the quality bars compare them."""
    out: dict[str, Any] = {}
    p2p = report.get("pix2pix") or {}
    if p2p.get("test"):
        n = p2p.get("n_test_patients", "?")
        out["pix2pix"] = {"model": p2p["test"], "baselines": p2p.get("baselines") or {},
                          "on": f"{n} test patient{'' if n == 1 else 's'}"}
    crgan = report.get("crgan") or {}
    heldout = crgan.get("heldout") or {}
    if heldout.get("model"):
        n = heldout.get("n", "?")
        out["crgan"] = {"model": heldout["model"], "baselines": heldout.get("baselines") or {},
                        "on": f"{n} held-out case{'' if n == 1 else 's'} of val and test patients",
                        "own_vs_other_ssim": (crgan.get("sample_quality") or {}).get("own_vs_other_ssim") or {}}
    return out
