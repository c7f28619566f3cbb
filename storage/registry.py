"""Versioned model registry: ``REGISTRY/models/<version>/`` plus a ``latest`` pointer.

Scheduled retraining publishes each trained (Pix2Pix, CRGAN) pair as a new,
immutable version; ``augment`` then uses ``latest`` (or a pinned version) instead
of training. A version directory holds::

    pix2pix.pt, pix2pix.pt.sha256, crgan.pt, crgan.pt.sha256,
    config.json (the PipelineConfig they were trained with),
    metrics.json (report.json sections 'pix2pix' and 'crgan'),
    sha256s.json, source.json (the SOUL fingerprint they were trained on)

Publishing copies into a staging directory, validates there (sha256 against the
run's sidecars, ``torch.load(weights_only=True)``, model name and image size in
the checkpoint meta), renames the directory into place, and only then replaces
``latest`` (a one-line text file written atomically). A crash or a bad checkpoint
therefore never moves ``latest`` and never leaves a half version under a real
name. Version names sort in publication order: ``v0001-20261125T093000Z``.
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
from storage.checkpoint_digest import read_digests, sidecar_path, write_sidecar
from storage.errors import BrvoError, CheckpointError
from storage.hashing import file_sha256, fsync_dir
from storage.locking import file_lock

MODELS = ("pix2pix", "crgan")
LATEST = "latest"
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

    def latest_version(self) -> str | None:
        path = self.root / LATEST
        if not path.exists():
            return None
        name = path.read_text().strip()
        return name or None

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
            sha256s = _read_json(vdir / "sha256s.json")
            source = _read_json(vdir / "source.json")
        except (OSError, json.JSONDecodeError) as exc:
            raise BrvoError(f"model version {version} in {self.root} is incomplete ({exc}); "
                            f"pin another version or run retrain again") from None
        ckpts = {m: vdir / f"{m}.pt" for m in MODELS}
        for m, path in ckpts.items():
            if not path.is_file():
                raise BrvoError(f"model version {version} in {self.root} lacks {path.name}; "
                                f"pin another version or run retrain again")
        return RegisteredModels(version=version, dir=vdir, pix2pix_checkpoint=ckpts["pix2pix"],
                                crgan_checkpoint=ckpts["crgan"], config=config, metrics=metrics,
                                sha256s=sha256s, source=source)

    def latest_source(self) -> dict[str, Any] | None:
        """source.json of ``latest`` (what the last successful retrain was trained on), or None."""
        version = self.latest_version()
        if version is None:
            return None
        try:
            return self.resolve(version).source
        except BrvoError:
            return None

    # ---- writing -------------------------------------------------------------------------------
    def publish(self, checkpoints: Mapping[str, str | os.PathLike], config: Any,
                source_fingerprint: Mapping[str, Any] | str, metrics: Mapping[str, Any],
                lock_timeout_s: float = 600.0) -> str:
        """Copy the trained Pix2Pix and CRGAN checkpoints into a new version; switch ``latest`` to it.

        ``checkpoints`` maps 'pix2pix' and 'crgan' to their best.pt; ``config`` is the PipelineConfig
        (or its dict) they were trained with; ``source_fingerprint`` the SOUL fingerprint (a dict with
        at least 'digest', or the digest string); ``metrics`` their held-out evaluations by model.
        Raises CheckpointError (``latest`` unchanged, no version left behind) when a checkpoint is
        missing, altered or not loadable.
        """
        missing = [m for m in MODELS if m not in checkpoints]
        if missing:
            raise CheckpointError(f"nothing to publish for {missing}; both models must be trained first")
        config_dict = json.loads(config.model_dump_json()) if hasattr(config, "model_dump_json") else dict(config)
        source = {"digest": source_fingerprint} if isinstance(source_fingerprint, str) else dict(source_fingerprint)
        metrics = {m: metrics[m] for m in MODELS if m in metrics}
        self.models_dir.mkdir(parents=True, exist_ok=True)
        busy = f"model registry {self.root} is being published to by another process (pid {{pid}}); retry later"
        with file_lock(self.root / ".publish.lock", lock_timeout_s, busy):
            for stale in self.models_dir.glob(".staging-*"):  # left by a killed publish (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            version = self._next_version()
            staging = self.models_dir / f".staging-{version}-{os.getpid()}"
            staging.mkdir()
            try:
                sha256s = {}
                for m in MODELS:
                    src = Path(checkpoints[m])
                    sha256s[f"{m}.pt"] = _copy_verified(src, staging / f"{m}.pt")
                    _validate_checkpoint(staging / f"{m}.pt", m, config_dict.get("image_size"))
                write_json_atomic(staging / "config.json", config_dict)
                write_json_atomic(staging / "metrics.json", metrics)
                write_json_atomic(staging / "sha256s.json", sha256s)
                write_json_atomic(staging / "source.json", {
                    **source,
                    "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                fsync_dir(staging)
                os.rename(staging, self.models_dir / version)
                fsync_dir(self.models_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            write_text_atomic(self.root / LATEST, version + "\n")
        return version

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
