"""Source fingerprints (what decides whether a scheduled retrain trains) and the retrain flow's quick path."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flows.retrain import config_fingerprint, is_unchanged, make_config, resolve_dirs, source_fingerprint
from storage.checkpoints import save_checkpoint
from storage.errors import BrvoError, InputDataError
from storage.fingerprint import fingerprint_source, source_files
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths


def _soul(root: Path) -> Path:
    for rel, data in {"S1/s1t1/image/1/1_a.jpg": b"img-a", "S1/s1t1/label/1/1_a.jpg": b"lab-a",
                      "S2/s2t1/image/2/2_b.jpg": b"img-b", "Infomation.xlsx": b"sheet"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_fingerprint_tracks_content_not_mtime(tmp_path):
    soul = _soul(tmp_path / "soul")
    fp = fingerprint_source(soul)
    assert fp.n_files == 4 and fp.total_bytes == 5 + 5 + 5 + 5
    img = soul / "S1/s1t1/image/1/1_a.jpg"
    os.utime(img, ns=(1, 1))  # touched, same bytes
    assert fingerprint_source(soul).digest == fp.digest
    # OS clutter and hidden files are ignored, as ingest ignores them
    (soul / "S1/.DS_Store").write_bytes(b"x")
    (soul / "S1/s1t1/image/Thumbs.db").write_bytes(b"x")
    assert fingerprint_source(soul).digest == fp.digest

    img.write_bytes(b"img-A")  # same size, other content
    changed = fingerprint_source(soul).digest
    assert changed != fp.digest
    (soul / "S3/s3t1/image/1").mkdir(parents=True)
    (soul / "S3/s3t1/image/1/1_c.jpg").write_bytes(b"new visit")
    added = fingerprint_source(soul).digest
    assert added != changed
    (soul / "S3/s3t1/image/1/1_c.jpg").rename(soul / "S3/s3t1/image/1/1_d.jpg")
    assert fingerprint_source(soul).digest != added  # a rename is a change


def test_fingerprint_cache_avoids_rehashing(tmp_path):
    soul, cache = _soul(tmp_path / "soul"), tmp_path / "reg" / ".fingerprint_cache.json"
    first = fingerprint_source(soul, cache)
    assert (first.hashed, first.reused) == (4, 0) and cache.exists()
    again = fingerprint_source(soul, cache)
    assert (again.hashed, again.reused, again.digest) == (0, 4, first.digest)
    # the cache is keyed by (path, size, mtime_ns): an edit that keeps size but moves mtime is re-hashed
    img = soul / "S2/s2t1/image/2/2_b.jpg"
    st = img.stat()
    img.write_bytes(b"img-B")
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    edited = fingerprint_source(soul, cache)
    assert (edited.hashed, edited.reused) == (1, 3) and edited.digest != first.digest
    # a damaged cache costs a re-hash, never a wrong answer
    cache.write_text("{not json")
    assert fingerprint_source(soul, cache).digest == edited.digest


def test_fingerprint_of_manifest_csv_covers_listed_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(b"a")
    (tmp_path / "imgs/a_label.png").write_bytes(b"al")
    csv = tmp_path / "manifest.csv"
    csv.write_text("patient_id,stage,image_path,label_path\n1,s1t1,imgs/a.png,imgs/a_label.png\n1,s1t2,imgs/b.png,\n")
    names = [name for name, _ in source_files(csv)]
    assert names == sorted(["manifest.csv", "imgs/a.png", "imgs/a_label.png", "imgs/b.png"])
    before = fingerprint_source(csv)
    (tmp_path / "imgs/b.png").write_bytes(b"b")  # a listed file that was missing appears
    assert fingerprint_source(csv).digest != before.digest
    with pytest.raises(InputDataError, match="not found"):
        fingerprint_source(tmp_path / "nope")


def test_symlink_outside_root_not_followed(tmp_path):
    soul = _soul(tmp_path / "soul")
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    base = fingerprint_source(soul).digest
    (soul / "S1/s1t1/image/1/1_z.jpg").symlink_to(tmp_path / "outside.jpg")
    with_link = fingerprint_source(soul).digest
    assert with_link != base  # the link is part of the source (ingest quarantines it) ...
    (tmp_path / "outside.jpg").write_bytes(b"other secret")
    assert fingerprint_source(soul).digest == with_link  # ... but what it points at is never read


def test_config_and_dirs(monkeypatch, tmp_path):
    cfg = make_config("tiny", json.dumps({"seed": 7, "pix2pix": {"epochs": 2}}))
    assert (cfg.image_size, cfg.seed, cfg.pix2pix.epochs) == (32, 7, 2)
    whole = make_config("demo", make_config("tiny").to_json())  # a whole config also works
    assert whole == make_config("tiny")
    with pytest.raises(BrvoError, match="not valid JSON"):
        make_config("tiny", "{")
    monkeypatch.delenv("BRVO_SOUL_DIR", raising=False)
    monkeypatch.delenv("BRVO_REGISTRY_DIR", raising=False)
    with pytest.raises(BrvoError, match="BRVO_SOUL_DIR"):
        resolve_dirs(None, str(tmp_path))
    monkeypatch.setenv("BRVO_SOUL_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("BRVO_REGISTRY_DIR", str(tmp_path / "r"))
    assert resolve_dirs(None, None) == (tmp_path / "s", tmp_path / "r")
    assert resolve_dirs("x", None)[0] == Path("x")


def _publish_fake(registry: ModelRegistry, run_dir: Path, config, source: dict) -> str:
    for model in ("pix2pix", "crgan"):
        save_checkpoint(RunPaths.of(run_dir).checkpoints(model) / "best.pt",
                        {"meta": {"model": model, "image_size": config.image_size}, "w": torch.zeros(2)})
    checkpoints = {m: RunPaths.of(run_dir).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")}
    return registry.publish(checkpoints, config, source, metrics={})


def test_unchanged_needs_same_data_and_config(tmp_path):
    soul, reg_dir = _soul(tmp_path / "soul"), tmp_path / "reg"
    registry, config = ModelRegistry(reg_dir), make_config("tiny")
    fp = source_fingerprint(soul, reg_dir)
    chash = config_fingerprint(config)
    assert not is_unchanged(registry, fp, chash)  # nothing published yet
    _publish_fake(registry, tmp_path / "run", config, {**fp.to_dict(), "config_hash": chash})
    assert is_unchanged(registry, source_fingerprint(soul, reg_dir), chash)
    assert not is_unchanged(registry, fp, config_fingerprint(make_config("demo")))
    (soul / "S2/s2t1/image/2/2_c.jpg").write_bytes(b"new visit")
    assert not is_unchanged(registry, source_fingerprint(soul, reg_dir), chash)


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_flow_reports_no_change_without_training(tmp_path, monkeypatch):
    """The scheduled path when nothing arrived: no ingest/training, a 'no change' result and status file."""
    from flows.retrain import retrain
    import tasks.pix2pix

    monkeypatch.setattr(tasks.pix2pix, "train_pix2pix", None)  # would fail if called
    from flows.phantom import PhantomConfig, generate_phantom

    soul, reg_dir = tmp_path / "soul", tmp_path / "reg"
    generate_phantom(soul, PhantomConfig(n_patients=2, seed=0, image_size=64))
    config = make_config("tiny")
    fp = source_fingerprint(soul, reg_dir)
    version = _publish_fake(ModelRegistry(reg_dir), tmp_path / "run", config,
                            {**fp.to_dict(), "config_hash": config_fingerprint(config)})
    result = retrain(soul_dir=str(soul), registry_dir=str(reg_dir), preset="tiny")
    assert result["status"] == "no change" and result["version"] == version
    assert json.loads((reg_dir / "last_retrain.json").read_text())["status"] == "no change"
    assert ModelRegistry(reg_dir).versions() == [version]
    with pytest.raises(InputDataError):
        retrain(soul_dir=str(tmp_path / "missing"), registry_dir=str(reg_dir), preset="tiny")


@pytest.mark.usefixtures("prefect_harness")
def test_failed_retrain_keeps_latest_and_records_failure(tmp_path, monkeypatch):
    from flows.retrain import retrain
    import tasks.ingest

    def broken_ingest(source, run_dir, **kwargs):
        raise BrvoError("disk full; free space and rerun")

    monkeypatch.setattr(tasks.ingest, "ingest", broken_ingest)
    soul, reg_dir = _soul(tmp_path / "soul"), tmp_path / "reg"
    config = make_config("tiny")
    version = _publish_fake(ModelRegistry(reg_dir), tmp_path / "run", config,
                            {"digest": "older data", "config_hash": config_fingerprint(config)})
    with pytest.raises(BrvoError, match="disk full"):
        retrain(soul_dir=str(soul), registry_dir=str(reg_dir), preset="tiny")
    status = json.loads((reg_dir / "last_retrain.json").read_text())
    assert status["status"] == "failed" and "disk full" in status["error"]
    assert ModelRegistry(reg_dir).latest_version() == version
