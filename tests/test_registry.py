"""Model registry: versions, the atomic 'latest' switch, validation before publishing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.errors import BrvoError, CheckpointError
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths
from tasks.config import preset


def _fake_run(run_dir: Path, image_size: int = 32, scale: float = 1.0) -> Path:
    """A run directory with best.pt checkpoints as the training loop writes them, plus report sections."""
    for model in ("pix2pix", "crgan"):
        payload = {"meta": {"model": model, "image_size": image_size, "config_hash": "x", "epoch": 1},
                   "modules": {"G": {"w": torch.full((3, 3), scale)}}}
        save_checkpoint(RunPaths.of(run_dir).checkpoints(model) / "best.pt", payload)
    (run_dir / "metrics.json").write_text(json.dumps({"pix2pix": {"test": {"dice": 0.5 * scale}},
                                                      "crgan": {"heldout": {"n": 3}}}))
    return run_dir


def _publish(reg: ModelRegistry, run_dir: Path, config, source) -> str:
    """What the retrain flow hands the registry: both best.pt checkpoints and their evaluations."""
    checkpoints = {m: RunPaths.of(run_dir).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")}
    return reg.publish(checkpoints, config, source, metrics=json.loads((run_dir / "metrics.json").read_text()))


def test_publish_then_resolve_latest(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    config = preset("tiny")
    v1 = _publish(reg, _fake_run(tmp_path / "run1"), config, {"digest": "abc", "n_files": 2})
    got = reg.resolve()
    assert got.version == v1 and reg.latest_version() == v1
    assert got.config["image_size"] == 32 and got.config["preset"] == "tiny"
    assert got.metrics["pix2pix"]["test"]["dice"] == 0.5 and "crgan" in got.metrics
    assert got.source["digest"] == "abc"
    for path in (got.pix2pix_checkpoint, got.crgan_checkpoint):
        payload = load_checkpoint(path)  # sha256 sidecar copied and verified
        assert torch.equal(payload["modules"]["G"]["w"], torch.ones(3, 3))
    assert set(got.sha256s) == {"pix2pix.pt", "crgan.pt"}

    v2 = _publish(reg, _fake_run(tmp_path / "run2", scale=2.0), config, "def")
    assert v2 > v1 and reg.versions() == [v1, v2]  # versions sort in publication order
    assert reg.resolve().version == v2 and reg.latest_source()["digest"] == "def"
    # pinning an older version still gives its own files
    old = reg.resolve(v1)
    assert torch.equal(load_checkpoint(old.crgan_checkpoint)["modules"]["G"]["w"], torch.ones(3, 3))


def test_corrupt_checkpoint_is_not_published_and_latest_stays(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    config = preset("tiny")
    v1 = _publish(reg, _fake_run(tmp_path / "run1"), config, "abc")

    bad = _fake_run(tmp_path / "run2")
    best = RunPaths.of(bad).checkpoints("crgan") / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: sidecar no longer matches
    best.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        _publish(reg, bad, config, "def")
    assert reg.latest_version() == v1 and reg.versions() == [v1]
    assert not [p for p in reg.models_dir.iterdir() if p.name.startswith(".staging")]

    # a file with a matching sidecar that is not a loadable (weights_only) checkpoint
    best.write_bytes(b"not a checkpoint")
    best.with_name("best.pt.sha256").write_text(__import__("hashlib").sha256(b"not a checkpoint").hexdigest())
    with pytest.raises(CheckpointError, match="cannot load"):
        _publish(reg, bad, config, "def")
    assert reg.resolve().version == v1


def test_missing_or_wrong_model_refused(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    run = _fake_run(tmp_path / "run", image_size=64)  # config says 32 px
    with pytest.raises(CheckpointError, match="64 px"):
        _publish(reg, run, preset("tiny"), "abc")
    (RunPaths.of(run).checkpoints("pix2pix") / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        _publish(reg, run, preset("tiny"), "abc")
    assert reg.latest_version() is None


def test_resolve_errors_are_one_line(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(BrvoError, match="no published models yet") as exc:
        reg.resolve()
    assert "\n" not in str(exc.value)
    v1 = _publish(reg, _fake_run(tmp_path / "run"), preset("tiny"), "abc")
    with pytest.raises(BrvoError, match=f"not found.*{v1}"):
        reg.resolve("v9999-20000101T000000Z")


def test_killed_publish_leaves_no_version_and_is_cleaned_up(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    stale = reg.models_dir / ".staging-v0001-20260101T000000Z-999"  # what a kill mid-copy leaves
    stale.mkdir(parents=True)
    (stale / "pix2pix.pt").write_bytes(b"half")
    assert reg.versions() == [] and reg.latest_version() is None
    version = _publish(reg, _fake_run(tmp_path / "run"), preset("tiny"), "abc")
    assert version.startswith("v0001-") and not stale.exists()


def test_augment_refuses_a_registry_version_of_another_image_size_before_any_work(tmp_path):
    """Issue 14: the version's own config decides; a mismatch fails before ingest, not after preprocess."""
    from flows.augment import augment_chain

    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "run1", image_size=64), preset("tiny").with_overrides(image_size=64),
                       "abc")
    (tmp_path / "soul").mkdir()
    with pytest.raises(BrvoError, match=f"registry version {version} was trained at 64 px but this run asks for 32"):
        augment_chain(tmp_path / "soul", tmp_path / "run", preset("tiny"), registry_dir=tmp_path / "reg")
    assert not (tmp_path / "run").exists()


def test_augment_refuses_a_registry_version_of_another_label_rule_before_any_work(tmp_path):
    """Models trained on 'nearest' labels would label a 'max' run's synthetic rows unlike its real ones."""
    from flows.augment import augment_chain

    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "run1"), preset("tiny"), "abc")
    (tmp_path / "soul").mkdir()
    with pytest.raises(BrvoError, match=f"registry version {version} was trained on labels resized by 'nearest'"):
        augment_chain(tmp_path / "soul", tmp_path / "run", preset("tiny").with_overrides(label_resize="max"),
                      registry_dir=tmp_path / "reg")
    assert not (tmp_path / "run").exists()


def test_augment_reads_the_registry_from_the_environment_like_retrain(tmp_path, monkeypatch):
    """Issue 14: a work-pool worker started with BRVO_REGISTRY_DIR gives augment its registry, as serve does."""
    from flows.augment import resolve_registry
    from flows.settings import registry_dir_setting

    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "run1"), preset("tiny"), "abc")
    monkeypatch.delenv("BRVO_REGISTRY_DIR", raising=False)
    assert registry_dir_setting(None) is None
    monkeypatch.setenv("BRVO_REGISTRY_DIR", str(tmp_path / "reg"))
    assert registry_dir_setting(None) == str(tmp_path / "reg") and registry_dir_setting("x") == "x"
    models = resolve_registry(registry_dir_setting(None), None, force_retrain=False)
    assert models.version == version
    assert resolve_registry(registry_dir_setting(None), None, force_retrain=True) is None
    assert resolve_registry(str(tmp_path / "empty"), None, force_retrain=False) is None  # nothing published
    with pytest.raises(BrvoError, match="not found"):
        resolve_registry(str(tmp_path / "reg"), "v9999-20000101T000000Z", force_retrain=False)
