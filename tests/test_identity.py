"""Checkpoint identity: what a checkpoint says about itself, and what a load or a resume refuses."""
from __future__ import annotations

import pytest
import torch

from brvo_models.configs import CRGANConfig, Pix2PixConfig
from brvo_models.identity import CheckpointIdentity, load_described
from storage.checkpoints import save_checkpoint
from storage.errors import CheckpointError


def _write(path, identity: CheckpointIdentity, **payload):
    save_checkpoint(path, {"meta": identity.meta, "config_json": identity.config_json,
                           "modules": {"G": {"w": torch.zeros(1)}}, **payload})
    return path


def test_training_hash_covers_what_changes_training_and_not_the_labelling_threshold():
    base = CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=8), 64, seed=0)
    same_training = CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=8, threshold=0.3), 64, seed=0)
    assert same_training.config_hash == base.config_hash
    assert same_training.config_json != base.config_json  # the description keeps the whole config
    for other in (CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=16), 64, 0),
                  CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=8), 64, 1),
                  CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=8), 128, 0)):
        assert other.config_hash != base.config_hash
    crgan = CheckpointIdentity("crgan", CRGANConfig(), 64, 0, {"patient_ids": ["001", "002"]})
    assert crgan.meta["patient_ids"] == ["001", "002"]
    assert CheckpointIdentity("crgan", CRGANConfig(eval_samples=9), 64, 0).config_hash == \
        CheckpointIdentity("crgan", CRGANConfig(), 64, 0).config_hash


def test_load_described_builds_the_config_from_the_checkpoint(tmp_path):
    identity = CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=8, norm="instance", threshold=0.4), 32, 0)
    path = _write(tmp_path / "best.pt", identity)
    loaded = load_described(path, "pix2pix", Pix2PixConfig)
    assert loaded.config == identity.config and loaded.image_size == 32
    assert load_described(path, "pix2pix", Pix2PixConfig, image_size=32).config.threshold == 0.4


def test_wrong_model_size_or_an_undescribed_checkpoint_is_a_one_line_error(tmp_path):
    path = _write(tmp_path / "best.pt", CheckpointIdentity("crgan", CRGANConfig(), 32, 0))
    for kwargs, match in (({"model": "pix2pix", "config_type": Pix2PixConfig}, "model='crgan'"),
                          ({"model": "crgan", "config_type": CRGANConfig, "image_size": 64}, "image_size=32")):
        with pytest.raises(CheckpointError, match=match) as exc:
            load_described(path, **kwargs)
        assert "\n" not in str(exc.value)
    old = tmp_path / "old.pt"  # a checkpoint whose config_json is not a self-description
    save_checkpoint(old, {"meta": {"model": "crgan", "image_size": 32}, "config_json": '{"crgan": {}, "seed": 0}'})
    with pytest.raises(CheckpointError, match="does not describe"):
        load_described(old, "crgan", CRGANConfig)
    bad = tmp_path / "bad.pt"  # a description whose config this version cannot build
    identity = CheckpointIdentity("crgan", CRGANConfig(), 32, 0)
    save_checkpoint(bad, {"meta": identity.meta,
                          "config_json": identity.config_json.replace('"ngf":64', '"ngf":"wide"')})
    with pytest.raises(CheckpointError, match="ngf") as exc:
        load_described(bad, "crgan", CRGANConfig)
    assert "\n" not in str(exc.value)
