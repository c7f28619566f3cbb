"""Versioned model registry: ``REGISTRY/models/<version>/`` plus a ``latest`` pointer.

Scheduled retraining publishes each trained (Pix2Pix, CRGAN) pair as a new,
immutable version; ``augment`` then uses ``latest`` (or a pinned version) instead
of training. A version directory holds::

    pix2pix.pt, pix2pix.pt.sha256, crgan.pt, crgan.pt.sha256,
    config.json (the PipelineConfig they were trained with),
    metrics.json (report.json sections 'pix2pix' and 'crgan', naming these files),
    sha256s.json (the manifest), source.json (the SOUL fingerprint they were trained on),
    promotion.json (whether it became ``latest`` and why: its bars, the scores compared),
    and whatever documents the publisher adds (the retrain's report.json and report.md)

Publishing copies into a staging directory, validates there (sha256 against the
run's sidecars, ``torch.load(weights_only=True)``, model name and image size in
the checkpoint meta), renames the directory into place, and only then replaces
``latest`` (a one-line text file written atomically). A crash or a bad checkpoint
therefore never moves ``latest`` and never leaves a half version under a real
name. Version names sort in publication order: ``v0001-20261125T093000Z``.

Champion and challenger: a publisher may hand over a promotion decision (flows/retrain.py
makes one: the new models met their quality bars and scored no worse than ``latest`` on the
same held-out data). Every version is published, but ``latest`` moves only when the decision
says so and was made against the ``latest`` that is still current. So versions can exist
with no ``latest`` at all (no retrain has passed yet): augment then trains its own models and
says so (:meth:`ModelRegistry.unpromoted_note`).

Every load of a version's checkpoint is checked against the version's manifest
(storage/checkpoint_digest.py), not only against the sidecar that travels with the file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from storage.atomic import write_json_atomic, write_text_atomic
from storage.checkpoint_digest import MANIFEST, read_digests, sidecar_path, verified_sha256, write_sidecar
from storage.errors import BrvoError, CheckpointError
from storage.hashing import file_sha256, fsync_dir
from storage.locking import file_lock

MODELS = ("pix2pix", "crgan")
LATEST = "latest"
PROMOTION = "promotion.json"
_VERSION_RE = re.compile(r"^v(\d{4,})-(\d{8}T\d{6}Z)$")


@dataclass(frozen=True)
class RegisteredModels:
    """One published version, as ``augment`` consumes it."""

    version: str
    dir: Path
    pix2pix_checkpoint: Path
    crgan_checkpoint: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256s: dict[str, str]
    source: dict[str, Any] = field(default_factory=dict)
    promotion: dict[str, Any] = field(default_factory=dict)  # empty for versions published before decisions


class ModelRegistry:
    """A registry rooted at ``root`` (created on first publish)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"

    # ---- reading -------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first (staging directories excluded)."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))

    def newest_version(self) -> str | None:
        """The version published last, promoted or not."""
        versions = self.versions()
        return versions[-1] if versions else None

    def latest_version(self) -> str | None:
        """The version ``latest`` names; None when no version was ever promoted.

        A ``latest`` that is there but empty, or names no published version, is a one-line
        BrvoError, not None: a researcher who set up a registry expects its vetted
        models, and neither training new ones nor guessing a version (the newest may be one that
        was not promoted) would tell them their registry is damaged. The message says how to repair it.
        """
        path = self.root / LATEST
        try:
            name = path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BrvoError(f"model registry {self.root}: cannot read its 'latest' pointer ({exc}); "
                            f"fix its permissions or pin a version with model_version=...") from None
        if _VERSION_RE.match(name) and (self.models_dir / name).is_dir():
            return name
        versions = self.versions()
        what = "is empty" if not name else f"names {name[:80]!r}, which is not a published version"
        there = f"{len(versions)} version(s) are (newest {versions[-1]})" if versions else "no version is"
        raise BrvoError(
            f"model registry {self.root}: its 'latest' pointer {what}, while {there}; augment will not guess "
            f"which models to use: write a version name into {path}, pin one with model_version=..., or delete "
            f"{path} (augment then trains its own models)")

    def unpromoted_note(self) -> str | None:
        """Why a registry with versions has no ``latest`` and what augment does instead (None when it has one,
        or no versions): none of its retrains met the bars and beat the one before, so augment trains the
        run's own models, as with an empty registry, rather than use models that failed their checks."""
        if self.latest_version() is not None:
            return None
        newest = self.newest_version()
        if newest is None:
            return None
        decision = self.promotion_of(newest)
        why = decision.get("summary") or "; ".join(decision.get("reasons") or []) or "no promotion recorded"
        return (f"model registry {self.root} holds {len(self.versions())} version(s) but none was promoted to latest "
                f"(newest {newest}: not promoted: {why}); this run trains its own models; pass "
                f"model_version={newest} to use that version anyway")

    def resolve(self, version: str | None = None) -> RegisteredModels:
        """The pinned ``version``, or ``latest`` when None; a one-line BrvoError when there is none."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise BrvoError(
                    f"model registry {self.root} has no published models yet; run the 'retrain' deployment "
                    f"(or brvo-augment with force_retrain) first"
                )
        if not _VERSION_RE.match(str(version)):  # a name, never a path: '../x' would leave the registry
            raise BrvoError(f"model version {version!r} in {self.root} is not a version name "
                            f"(like v0001-20261125T093000Z); pass one of: {', '.join(self.versions()[-5:]) or 'none'}")
        vdir = self.models_dir / version
        if not vdir.is_dir():
            known = ", ".join(self.versions()[-5:]) or "none"
            raise BrvoError(f"model version {version!r} not found in {self.root} (latest versions: {known}); "
                            f"pass one of those or leave model_version empty for latest")
        try:
            config = _read_json(vdir / "config.json")
            metrics = _read_json(vdir / "metrics.json")
            sha256s = _read_json(vdir / MANIFEST)
            source = _read_json(vdir / "source.json")
        except (OSError, json.JSONDecodeError) as exc:
            raise BrvoError(f"model version {version} in {self.root} is incomplete ({exc}); "
                            f"pin another version or run retrain again") from None
        ckpts = {m: vdir / f"{m}.pt" for m in MODELS}
        for m, path in ckpts.items():
            if not path.is_file():
                raise BrvoError(f"model version {version} in {self.root} lacks {path.name}; "
                                f"pin another version or run retrain again")
            verified_sha256(path)  # its bytes, against its sidecar and this version's manifest
        for m, path in ckpts.items():  # versions published before paths were rewritten named the work directory
            section = metrics.get(m)
            if isinstance(section, dict) and isinstance(section.get("checkpoint"), dict):
                section["checkpoint"] = {**section["checkpoint"], "path": str(path)}
        return RegisteredModels(version=version, dir=vdir, pix2pix_checkpoint=ckpts["pix2pix"],
                                crgan_checkpoint=ckpts["crgan"], config=config, metrics=metrics,
                                sha256s=sha256s, source=source, promotion=_read_json_or_empty(vdir / PROMOTION))

    def promotion_of(self, version: str) -> dict[str, Any]:
        """promotion.json of ``version`` without loading its checkpoints ({} for versions published before it)."""
        if not _VERSION_RE.match(str(version)):
            return {}
        return _read_json_or_empty(self.models_dir / version / PROMOTION)

    def source_of(self, version: str | None) -> dict[str, Any] | None:
        """source.json of ``version`` (what it was trained on), or None when there is none or it is unreadable."""
        if version is None:
            return None
        try:
            return _read_json(self.models_dir / version / "source.json")
        except (OSError, json.JSONDecodeError):
            return None

    def latest_source(self) -> dict[str, Any] | None:
        """source.json of ``latest`` (what the last promoted retrain was trained on), or None."""
        return self.source_of(self.latest_version())

    # ---- writing -------------------------------------------------------------------------------
    def publish(self, checkpoints: Mapping[str, str | os.PathLike], config: Any,
                source_fingerprint: Mapping[str, Any] | str, metrics: Mapping[str, Any],
                lock_timeout_s: float = 600.0, *, promotion: Mapping[str, Any] | None = None,
                documents: Mapping[str, str | os.PathLike] | None = None) -> str:
        """Copy the trained Pix2Pix and CRGAN checkpoints into a new version; switch ``latest`` to it when
        the promotion decision says so (always, when there is none).

        ``checkpoints`` maps 'pix2pix' and 'crgan' to their best.pt; ``config`` is the PipelineConfig
        (or its dict) they were trained with; ``source_fingerprint`` the SOUL fingerprint (a dict with
        at least 'digest', or the digest string); ``metrics`` their held-out evaluations by model (a
        section's ``checkpoint.path`` is rewritten to the published file). ``promotion``: the decision,
        with ``promote`` (bool), ``champion`` (the ``latest`` it was compared with, or None) and
        ``reasons``; ``latest`` moves only when ``promote`` holds and ``latest`` is still ``champion``.
        It is kept, with the outcome, as promotion.json. ``documents``: further files copied into the
        version, by their name there. Returns the version; :meth:`resolve` tells whether it was promoted.
        Raises CheckpointError (``latest`` unchanged, no version left behind) when a checkpoint is
        missing, altered or not loadable.
        """
        missing = [m for m in MODELS if m not in checkpoints]
        if missing:
            raise CheckpointError(f"nothing to publish for {missing}; both models must be trained first")
        config_dict = json.loads(config.model_dump_json()) if hasattr(config, "model_dump_json") else dict(config)
        source = {"digest": source_fingerprint} if isinstance(source_fingerprint, str) else dict(source_fingerprint)
        metrics = json.loads(json.dumps({m: metrics[m] for m in MODELS if m in metrics}))  # a copy we may rewrite
        self.models_dir.mkdir(parents=True, exist_ok=True)
        busy = f"model registry {self.root} is being published to by another process (pid {{pid}}); retry later"
        with file_lock(self.root / ".publish.lock", lock_timeout_s, busy):
            for stale in self.models_dir.glob(".staging-*"):  # left by a killed publish (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            version = self._next_version()
            decision = self._final_decision(promotion)
            staging = self.models_dir / f".staging-{version}-{os.getpid()}"
            staging.mkdir()
            try:
                sha256s = {}
                for m in MODELS:
                    src = Path(checkpoints[m])
                    sha256s[f"{m}.pt"] = _copy_verified(src, staging / f"{m}.pt")
                    _validate_checkpoint(staging / f"{m}.pt", m, config_dict.get("image_size"))
                    if isinstance((metrics.get(m) or {}).get("checkpoint"), dict):
                        metrics[m]["checkpoint"]["path"] = str(self.models_dir / version / f"{m}.pt")
                for name, path in (documents or {}).items():
                    if Path(name).name != name or name in (MANIFEST, PROMOTION) or name.endswith(".pt"):
                        raise ValueError(f"document name {name!r} would replace a file of the version")
                    shutil.copyfile(path, staging / name)
                write_json_atomic(staging / "config.json", config_dict)
                write_json_atomic(staging / "metrics.json", metrics)
                write_json_atomic(staging / MANIFEST, sha256s)
                write_json_atomic(staging / "source.json", {
                    **source,
                    "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                write_json_atomic(staging / PROMOTION, decision)
                fsync_dir(staging)
                os.rename(staging, self.models_dir / version)
                fsync_dir(self.models_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if decision["promoted"]:
                write_text_atomic(self.root / LATEST, version + "\n")
        return version

    def _final_decision(self, promotion: Mapping[str, Any] | None) -> dict[str, Any]:
        """promotion.json of a version being published (under the publish lock): the publisher's decision,
        and whether it holds now. A decision made against a ``latest`` that has moved since, or a
        broken ``latest`` pointer, does not promote: the new version was never compared with the current one."""
        try:
            current, broken = self.latest_version(), None
        except BrvoError as exc:
            current, broken = None, str(exc)
        decision = dict(promotion) if promotion is not None else {"promote": True, "champion": current, "reasons": []}
        reasons = list(decision.get("reasons") or [])
        promoted = bool(decision.get("promote"))
        if promoted and broken:
            promoted = False
            reasons.append(f"the 'latest' pointer is broken ({broken})")
        elif promoted and decision.get("champion") != current:
            promoted = False
            reasons.append(f"it was compared with {decision.get('champion') or 'no version'}, but latest is "
                           f"{current or 'none'} now; run retrain again to compare it with that")
        summary = decision.get("summary") if promoted == bool(decision.get("promote")) else "; ".join(reasons)
        return {**decision, "reasons": reasons, "summary": summary or "; ".join(reasons), "promoted": promoted,
                "latest_before": current, "decided_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _next_version(self) -> str:
        numbers = [int(_VERSION_RE.match(v).group(1)) for v in self.versions()]
        n = max(numbers, default=0) + 1
        return f"v{n:04d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _copy_verified(src: Path, dst: Path) -> str:
    """Copy a checkpoint and its sidecar; the copy's sha256 must equal the source's recorded one."""
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint not found; the training step did not finish, run retrain again")
    recorded = read_digests(src)
    if recorded is None:
        raise CheckpointError(f"{sidecar_path(src)}: sha256 sidecar missing; the checkpoint cannot be verified, retrain")
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
    actual = file_sha256(dst)
    if actual not in recorded:
        raise CheckpointError(f"{src}: sha256 mismatch (interrupted or altered checkpoint); "
                              f"nothing was published, retrain")
    write_sidecar(dst, actual)
    return actual


def _validate_checkpoint(path: Path, model: str, image_size: int | None) -> None:
    """Loads with weights_only (sha256 checked again) and checks it is the right model and size."""
    from storage.checkpoints import (
        load_checkpoint,  # torch: imported only when publishing
    )

    payload = load_checkpoint(path)
    meta = payload.get("meta", {})
    if meta.get("model") not in (None, model):
        raise CheckpointError(f"{path}: holds model {meta.get('model')!r}, expected {model!r}; nothing was published")
    if image_size is not None and meta.get("image_size") not in (None, int(image_size)):
        raise CheckpointError(f"{path}: trained at {meta.get('image_size')} px but the config says {image_size}; "
                              f"nothing was published")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    """An optional JSON file of a version (promotion.json: absent in versions published before it)."""
    try:
        data = _read_json(path)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
