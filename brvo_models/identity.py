"""Checkpoint identity, one scheme for every model: what a checkpoint says it is, and what a run checks.

A checkpoint describes itself. Its ``config_json`` is the canonical JSON of
``{"model", "image_size", "seed", "config"}`` with the model's whole config, so a loader
builds the network from the checkpoint alone: a caller passes a path and a device, never a
config that could disagree with the weights. Its ``meta`` holds what a run compares before
it loads or resumes (:func:`storage.checkpoints.load_checkpoint` ``expect=``):

* ``model`` and ``image_size``: a checkpoint of another model or size is refused;
* ``config_hash``: the hash of everything that changes training (the description without
  the config's ``inference_only`` fields, e.g. Pix2Pix's labelling threshold, and its
  ``execution_only`` ones, e.g. whether CUDA graphs run the steps), so resuming
  under another config or seed, which could not end where an uninterrupted run would, is
  refused;
* a model's own keys (CRGAN: ``patient_ids``, its embedding rows in order).

Each refusal is a one-line :class:`storage.errors.CheckpointError`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from storage.checkpoints import load_checkpoint
from storage.errors import CheckpointError
from storage.hashing import canonical_json, json_sha256

ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True)
class CheckpointIdentity:
    """The identity of the checkpoints one training run writes."""

    model: str
    config: BaseModel
    image_size: int
    seed: int
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def _described(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "image_size": int(self.image_size), "seed": int(self.seed), "config": fields}

    @property
    def config_json(self) -> str:
        """The self-description stored in every checkpoint (the whole model config)."""
        return canonical_json(self._described(self.config.model_dump(mode="json")))

    @property
    def config_hash(self) -> str:
        """Hash of what changes training: the description without the inference-only fields."""
        fields = self.config.model_dump(mode="json")
        for name in (*getattr(self.config, "inference_only", ()), *getattr(self.config, "execution_only", ())):
            fields.pop(name, None)
        return json_sha256(self._described(fields))

    @property
    def meta(self) -> dict[str, Any]:
        """What a resume or a load checks against the checkpoint's meta."""
        return {"model": self.model, "image_size": int(self.image_size), "config_hash": self.config_hash,
                **self.extra_meta}


@dataclass(frozen=True)
class DescribedCheckpoint:
    """A loaded checkpoint with the model config and image size it was trained with."""

    state: dict[str, Any]
    config: BaseModel
    image_size: int


def load_described(path: str | os.PathLike, model: str, config_type: type[ConfigT],
                   image_size: int | None = None) -> DescribedCheckpoint:
    """Load ``path`` (sha256 verified, ``weights_only``) and the config it describes.

    Refused with a one-line CheckpointError: a checkpoint of another model, of another image
    size than ``image_size`` (when the caller needs one), or without a valid description of
    its ``config_type`` (written by an older brvo-augment, or altered).
    """
    expect: dict[str, Any] = {"model": model}
    if image_size is not None:
        expect["image_size"] = int(image_size)
    state = load_checkpoint(path, expect=expect)
    try:
        described = json.loads(state.get("config_json") or "null")
    except (TypeError, json.JSONDecodeError):
        described = None
    if not isinstance(described, dict) or described.get("model") != model or "config" not in described:
        raise CheckpointError(f"{path}: the checkpoint does not describe its {model} config (written by an older "
                              f"brvo-augment?); retrain the model")
    try:
        config = config_type.model_validate(described["config"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CheckpointError(f"{path}: its {model} config does not validate here ({where}: {first['msg']}); "
                              f"retrain the model with this version") from None
    return DescribedCheckpoint(state=state, config=config, image_size=int(described["image_size"]))
