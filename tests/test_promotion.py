"""A broken or worse model never becomes `latest`, training and config refuse non-finite numbers, and a
registry model's provenance is the bytes actually loaded.

Champion and challenger: a retrain publishes every version it trains, but moves `latest` only when
the new models meet their quality bars and score no worse than the current `latest` on the same
held-out data. The champion comparison runs on real (tiny) checkpoints trained once for the module.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brvo_models.configs import Pix2PixConfig
from brvo_models.identity import CheckpointIdentity
from brvo_models.training import Schedule, fit
from storage.checkpoint_digest import verified_sha256
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.errors import BrvoError, CheckpointError
from storage.registry import ModelRegistry
from storage.run_dir import RunPaths
from tasks.config import load_config, preset

from conftest import write_blob_dataset

REPO = Path(__file__).resolve().parents[1]


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------ config: finite numbers


@pytest.mark.parametrize("config_json, field, shown", [
    ('{"pix2pix": {"lr": Infinity}}', "pix2pix.lr", "inf"),
    ('{"crgan": {"lr_g": NaN}}', "crgan.lr_g", "nan"),
    ('{"pix2pix": {"lambda_l1": -Infinity}}', "pix2pix.lambda_l1", "-inf"),
    ('{"max_abs_density_z": Infinity}', "max_abs_density_z", "inf"),
])
def test_a_non_finite_config_number_is_refused_naming_the_field(tmp_path, config_json, field, shown):
    """Python's json reads Infinity and NaN; pydantic took inf as a valid lr and the published config.json said
    `lr: null`. Every way a config arrives (retrain's config_json, a --config file) refuses it in one line."""
    from flows.retrain import make_config

    with pytest.raises(BrvoError) as exc:
        make_config("tiny", config_json)
    assert f"{field} must be a finite number, got {shown}" in _one_line(exc)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(config_json)
    with pytest.raises(BrvoError) as exc:
        load_config("tiny", cfg)
    assert f"{field} must be a finite number, got {shown}" in _one_line(exc)


def test_a_non_finite_config_on_the_command_line_is_one_line_exit_2_before_any_work(tmp_path):
    (tmp_path / "soul").mkdir()
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"pix2pix": {"lr": Infinity}}')
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "soul"), str(tmp_path / "run"),
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120, cwd=REPO)
    code, err = proc.returncode, proc.stderr
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: config") and "pix2pix.lr must be a finite number, got inf" in err
    assert "valid number" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["pix2pix.ngf", "pix2pix.ndf", "crgan.ngf", "crgan.hidden_dim"])
def test_an_absurd_network_width_is_refused_naming_the_field(field):
    """pix2pix.ngf=100000 was an allocation traceback deep in training."""
    with pytest.raises(BrvoError) as exc:
        preset("tiny").with_overrides(**{field: 100000})
    assert _one_line(exc).startswith("config: ") and field in str(exc.value)


def test_an_unknown_config_section_names_every_section_there_is():
    """A misspelt section ('input_sanit.min_image_side') must be told every real one, input_sanity included."""
    config = preset("tiny")

    def sections(data: dict, prefix: str = "") -> list[str]:
        return [name for key, value in data.items() if isinstance(value, dict)
                for name in (prefix + key, *sections(value, f"{prefix}{key}."))]

    with pytest.raises(BrvoError) as exc:
        config.with_overrides(**{"input_sanit.min_image_side": 8})
    text = _one_line(exc)
    assert text.startswith("config: unknown section 'input_sanit'")
    assert all(re.search(rf"\b{re.escape(name)}\b", text) for name in sections(config.model_dump())), text


def test_an_allocation_failure_while_training_is_one_line_naming_the_model_and_what_to_lower(tmp_path):
    """Widths inside the range can still not fit a machine: the allocator's error becomes one line."""
    from tasks.shared.trained_model import train_and_evaluate
    from tasks.engine import StepContext

    def train(run_dir, config, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 1280000000000 bytes.")

    ctx = StepContext(run_dir=tmp_path, config=preset("tiny"), log=lambda _m: None, key="k")
    with pytest.raises(BrvoError) as exc:
        train_and_evaluate(ctx, "pix2pix", train, lambda *a, **k: {}, soul_h5=tmp_path / "soul.h5")
    text = _one_line(exc)
    assert text.startswith("pix2pix: out of memory") and "1280000000000 bytes" in text
    assert "pix2pix.ngf" in text and "batch_size" in text

    def buggy(run_dir, config, **kwargs):  # any other RuntimeError is a bug and keeps its traceback
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_and_evaluate(ctx, "pix2pix", buggy, lambda *a, **k: {}, soul_h5=tmp_path / "soul.h5")


# ------------------------------------------------------------------------------------ training: non-finite loss


class _DivergingModel:
    """A one-weight Trainable whose loss turns NaN (or inf) from step ``bad_step`` on."""

    name = "fake"

    def __init__(self, bad_step: int, bad_value: float = float("nan"), tensor_losses: bool = True) -> None:
        self.net = torch.nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.bad_step, self.bad_value, self.tensor_losses, self.steps = bad_step, bad_value, tensor_losses, 0

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def train_step(self, batch):
        self.steps += 1
        loss = ((self.net(batch) - batch) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        value = loss.detach() * (self.bad_value if self.steps >= self.bad_step else 1.0)
        return {"loss": value, "other": torch.tensor(1.0)} if self.tensor_losses else {"loss": float(value)}

    def validate(self):
        return {"score": -float(self.net.weight.abs().sum())}


def _fit_diverging(model, tmp_path, val_every=10):
    config = Pix2PixConfig(schedule="adaptive", epochs=1, min_steps=30, max_steps=30, val_every=val_every)
    schedule = Schedule.from_config(config, 5)

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(5):
            yield torch.randn(4, 1, generator=g)

    return fit(model, batches, schedule=schedule, checkpoint_dir=tmp_path / "ckpt",
               identity=CheckpointIdentity("fake", config, 32, 0), log=lambda _m: None)


@pytest.mark.parametrize("tensor_losses", [True, False])
@pytest.mark.parametrize("bad_value, word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_non_finite_loss_stops_training_in_one_line_at_its_step(tmp_path, tensor_losses, bad_value, word):
    """The step that went bad is named exactly, although the losses reach the host only at validations; the
    diverged weights are never written as a checkpoint (the last good one, from step 10, stays)."""
    with pytest.raises(BrvoError) as exc:
        _fit_diverging(_DivergingModel(bad_step=13, bad_value=bad_value, tensor_losses=tensor_losses), tmp_path)
    text = _one_line(exc)
    assert text.startswith(f"fake: loss became {word} at step 13 (loss)"), text
    assert "learning rate" in text
    last = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert last["meta"]["step"] == 10


def test_watching_for_a_non_finite_loss_never_reads_a_loss_back_to_the_host(monkeypatch):
    """fit adds tensor losses where they live (on CUDA, no step waits for the GPU); so must the watch."""
    from brvo_models.training import LossSums

    def no_sync(*_a, **_k):
        raise AssertionError("LossSums.add read a tensor back to the host")

    sums = LossSums()
    with monkeypatch.context() as m:
        for name in ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, no_sync)
        for step in range(1, 8):
            bad = step >= 5
            sums.add({"a": torch.tensor(float("nan") if bad else 1.0), "b": torch.tensor(2.0), "c": 0.5}, step=step)
    assert sums.first_non_finite_step() == 5


def test_a_non_finite_validation_score_stops_training_in_one_line(tmp_path):
    """CRGAN at a diverging lr validated NaN SSIMs, never saved a best checkpoint and ended in
    'no step was validated'."""
    model = _DivergingModel(bad_step=10**9)
    model.validate = lambda: {"score": float("nan")}
    with pytest.raises(BrvoError) as exc:
        _fit_diverging(model, tmp_path)
    assert _one_line(exc).startswith("fake: validation score became NaN at step 10")
    assert not (tmp_path / "ckpt" / "best.pt").exists()


@pytest.mark.parametrize("model", ["pix2pix", "crgan"])
def test_both_gans_at_a_diverging_learning_rate_fail_in_one_line(tmp_path, model):
    """Pix2Pix trained on NaN losses to val Dice 0 and was published; CRGAN ended in 'no step was validated'."""
    from tasks.crgan import train_crgan
    from tasks.pix2pix import train_pix2pix

    write_blob_dataset(RunPaths.of(tmp_path).soul_h5)
    fields = {"pix2pix.lr": 1e30} if model == "pix2pix" else {"crgan.lr_g": 1e30, "crgan.lr_d": 1e30}
    config = preset("tiny").with_overrides(**fields)
    with pytest.raises(BrvoError) as exc:
        (train_pix2pix if model == "pix2pix" else train_crgan)(tmp_path, config, log=lambda _m: None)
    text = _one_line(exc)
    assert text.startswith(f"{model}: loss became") and "learning rate" in text, text
    assert not (RunPaths.of(tmp_path).checkpoints(model) / "best.pt").exists()


def test_a_diverging_training_step_on_the_command_line_is_one_line_exit_2(prefect_harness, tiny_phantom, tmp_path):
    """Through the Prefect task and the CLI's BrvoError path: `error: pix2pix: loss became NaN ...`, exit 2."""
    from flows.cli import main

    run = tmp_path / "run"
    assert main(["prepare", str(tiny_phantom), str(run), "--preset", "tiny"]) == 0
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"pix2pix": {"lr": 1e30}}')
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # where the CLI prints `error: ...`
        code = main(["train-pix2pix", str(run), "--preset", "tiny", "--config", str(cfg)])
    err = stderr.getvalue().strip().splitlines()
    assert code == 2 and err[-1].startswith("error: pix2pix: loss became NaN at step "), err[-3:]
    assert not (RunPaths.of(run).checkpoints("pix2pix") / "best.pt").exists()


# ------------------------------------------------------------------------------------ registry: provenance


def _fake_run(run_dir: Path, scale: float = 1.0, image_size: int = 32) -> Path:
    """best.pt checkpoints as training writes them, and report sections naming them (as the steps do)."""
    for model in ("pix2pix", "crgan"):
        save_checkpoint(RunPaths.of(run_dir).checkpoints(model) / "best.pt",
                        {"meta": {"model": model, "image_size": image_size},
                         "modules": {"G": {"w": torch.full((3, 3), scale)}}})
    return run_dir


def _sections(run_dir: Path) -> dict:
    return {m: {"checkpoint": {"path": str(RunPaths.of(run_dir).checkpoints(m) / "best.pt"), "step": 1}}
            for m in ("pix2pix", "crgan")}


def _publish(reg: ModelRegistry, run_dir: Path, **kwargs) -> str:
    checkpoints = {m: RunPaths.of(run_dir).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")}
    return reg.publish(checkpoints, preset("tiny"), {"digest": f"d{run_dir.name}"}, metrics=_sections(run_dir),
                       **kwargs)


def test_a_checkpoint_copied_in_from_another_version_is_refused_at_resolve_and_at_load(tmp_path):
    """Its own sidecar vouches for it, but the version's manifest names other bytes: augmented.h5's
    pix2pix_sha256 (the manifest's) would name a file that was not the one used."""
    reg = ModelRegistry(tmp_path / "reg")
    v1 = _publish(reg, _fake_run(tmp_path / "run1", scale=1.0))
    v2 = _publish(reg, _fake_run(tmp_path / "run2", scale=2.0))
    for name in ("pix2pix.pt", "pix2pix.pt.sha256"):
        shutil.copyfile(reg.models_dir / v1 / name, reg.models_dir / v2 / name)
    with pytest.raises(CheckpointError) as exc:
        reg.resolve(v2)
    text = _one_line(exc)
    assert f"{v2}" in text and "pix2pix.pt" in text and "not the bytes" in text
    with pytest.raises(CheckpointError) as exc:  # every load checks the version's manifest, not only resolve
        load_checkpoint(reg.models_dir / v2 / "pix2pix.pt")
    assert "sha256s.json" in _one_line(exc)
    assert reg.resolve(v1).sha256s["pix2pix.pt"] == verified_sha256(reg.models_dir / v1 / "pix2pix.pt")


def test_a_registry_model_names_its_published_file_not_the_deleted_work_directory(tmp_path):
    """report.json's checkpoint.path came from the version's metrics.json, which named REGISTRY/work/..."""
    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "work" / "abc"))
    shutil.rmtree(tmp_path / "work")  # what retrain does after publishing
    models = reg.resolve()
    for model in ("pix2pix", "crgan"):
        path = Path(models.metrics[model]["checkpoint"]["path"])
        assert path == reg.models_dir / version / f"{model}.pt" and path.is_file()
        on_disk = json.loads((reg.models_dir / version / "metrics.json").read_text())
        assert on_disk[model]["checkpoint"]["path"] == str(path)


@pytest.mark.parametrize("pointer", ["", "\n", "v0099-20260101T000000Z\n", "../../etc\n"])
def test_an_empty_or_broken_latest_pointer_is_a_one_line_error_not_silent_training(tmp_path, pointer):
    from flows.augment import resolve_registry

    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "run"))
    (reg.root / "latest").write_text(pointer)
    with pytest.raises(BrvoError) as exc:
        resolve_registry(str(reg.root), None, force_retrain=False)
    text = _one_line(exc)
    assert "'latest' pointer" in text and version in text and "model_version" in text


def test_versions_that_were_never_promoted_leave_augment_training_its_own_models_with_a_warning(tmp_path,
                                                                                                 monkeypatch):
    import flows.augment
    from flows.augment import resolve_registry

    reg = ModelRegistry(tmp_path / "reg")
    version = _publish(reg, _fake_run(tmp_path / "run"),
                       promotion={"promote": False, "champion": None, "reasons": ["2 bars missed"]})
    assert reg.latest_version() is None and reg.versions() == [version]
    warnings: list[str] = []
    monkeypatch.setattr(flows.augment, "run_warning", warnings.append)  # the run's WARNING log
    assert resolve_registry(str(reg.root), None, force_retrain=False) is None
    assert any(version in w and "not promoted" in w and "2 bars missed" in w and "trains its own" in w
               for w in warnings), warnings
    assert resolve_registry(str(reg.root), version, force_retrain=False).version == version  # pinning still works


# ------------------------------------------------------------------------------------ registry: promotion


def test_a_version_published_without_promotion_keeps_latest_and_records_why(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    v1 = _publish(reg, _fake_run(tmp_path / "run1"))
    decision = {"promote": False, "champion": v1, "reasons": ["pix2pix test Dice 0.2 < latest's 0.3"],
                "bars": {"pix2pix_beats_baselines": True}}
    v2 = _publish(reg, _fake_run(tmp_path / "run2", scale=2.0), promotion=decision)
    assert reg.versions() == [v1, v2] and reg.latest_version() == v1
    recorded = reg.resolve(v2).promotion
    assert recorded["promoted"] is False and recorded["reasons"] == decision["reasons"]
    assert recorded["latest_before"] == v1 and recorded["bars"] == {"pix2pix_beats_baselines": True}
    v3 = _publish(reg, _fake_run(tmp_path / "run3"), promotion={"promote": True, "champion": v1, "reasons": []})
    assert reg.latest_version() == v3 and reg.resolve(v3).promotion["promoted"] is True


def test_a_decision_made_against_another_latest_does_not_promote(tmp_path):
    """The champion may change between the comparison and the publish: only the compared one may be replaced."""
    reg = ModelRegistry(tmp_path / "reg")
    v1 = _publish(reg, _fake_run(tmp_path / "run1"))
    v2 = _publish(reg, _fake_run(tmp_path / "run2"), promotion={"promote": True, "champion": None, "reasons": []})
    assert reg.latest_version() == v1
    assert "latest is " + v1 in reg.resolve(v2).promotion["reasons"][0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with soul.h5 (blobs, 8 patients) and tiny Pix2Pix and CRGAN checkpoints trained on it."""
    from tasks.crgan import train_crgan
    from tasks.pix2pix import train_pix2pix

    run_dir = tmp_path_factory.mktemp("trained")
    write_blob_dataset(RunPaths.of(run_dir).soul_h5)
    config = preset("tiny")
    train_pix2pix(run_dir, config, log=lambda _m: None)
    train_crgan(run_dir, config, log=lambda _m: None)
    return run_dir, config


def _report(pix2pix_test: dict, crgan_model: dict, met: bool = True) -> dict:
    """A retrain's report sections; every baseline below (``met``) or above the model."""
    low = -1.0 if met else 2.0
    return {"pix2pix": {"test": pix2pix_test, "n_test_patients": 2,
                        "baselines": {b: {"dice": low, "cldice": low} for b in ("otsu", "frangi", "segmenter")}},
            "crgan": {"heldout": {"model": crgan_model, "test_only": {"n": 3, "model": crgan_model},
                                  "baselines": {b: {"ssim": low, "psnr": low * 100}
                                                for b in ("nearest", "neighbour_mean")}},
                      "sample_quality": {"own_vs_other_ssim": {"own": 0.5, "other": 0.4 if met else 0.6}}}}


def _champion(tmp_path: Path, run_dir: Path, config) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "reg")
    checkpoints = {m: RunPaths.of(run_dir).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")}
    reg.publish(checkpoints, config, {"digest": "older"}, metrics={})
    return reg


def test_the_champion_is_scored_on_the_challengers_held_out_data_and_a_worse_challenger_is_not_promoted(
        trained_run, tmp_path):
    from tasks.analyses.promotion import champion_scores, decide_promotion

    run_dir, config = trained_run
    reg = _champion(tmp_path, run_dir, config)
    champion = reg.resolve()
    scores = champion_scores(run_dir, config, champion, log=lambda _m: None)
    p2p, crg = scores["pix2pix"], scores["crgan"]
    assert 0.0 <= p2p["dice"] <= 1.0 and 0.0 <= p2p["cldice"] <= 1.0 and p2p["n"] > 0
    assert -1.0 <= crg["ssim"] <= 1.0 and crg["psnr"] > 0 and crg["n"] > 0

    # the same models as the champion: not worse, so promoted (bars met)
    same = decide_promotion(run_dir, config, _report({**p2p}, {**crg}), champion, log=lambda _m: None)
    assert same.promote and same.champion == champion.version and not same.reasons
    assert same.comparison["pix2pix"]["dice"] == {"challenger": p2p["dice"], "champion": p2p["dice"]}

    worse = decide_promotion(run_dir, config, _report({**p2p, "dice": p2p["dice"] - 0.05}, {**crg}), champion,
                             log=lambda _m: None)
    assert not worse.promote
    assert worse.reasons == [f"pix2pix test Dice {p2p['dice'] - 0.05:.4f} < latest {champion.version}'s "
                             f"{p2p['dice']:.4f} on this run's test patients"]
    assert worse.summary() == worse.reasons[0]

    crgan_worse = decide_promotion(run_dir, config, _report({**p2p}, {**crg, "psnr": crg["psnr"] - 1}), champion,
                                   log=lambda _m: None)
    assert not crgan_worse.promote and crgan_worse.reasons[0].startswith("crgan held-out PSNR")


def test_missed_bars_are_never_promoted_and_the_reason_names_them(trained_run, tmp_path):
    from tasks.analyses.promotion import decide_promotion

    run_dir, config = trained_run
    report = _report({"dice": 0.9, "cldice": 0.9}, {"ssim": 0.9, "psnr": 30.0}, met=False)
    decision = decide_promotion(run_dir, config, report, None, log=lambda _m: None)
    assert not decision.promote and decision.champion is None
    missed = ["pix2pix_beats_baselines", "crgan_beats_baselines", "crgan_patient_specific"]
    assert decision.bars == {bar: False for bar in missed}
    assert decision.summary() == f"3 bars missed ({', '.join(missed)})"
    first = decide_promotion(run_dir, config, _report({"dice": 0.9, "cldice": 0.9}, {"ssim": 0.9, "psnr": 30.0}),
                             None, log=lambda _m: None)
    assert first.promote and first.summary() == "all 3 quality bars met; no latest to compare with"


def test_a_champion_of_another_image_size_is_not_compared_and_says_so(trained_run, tmp_path):
    from tasks.analyses.promotion import decide_promotion

    run_dir, config = trained_run
    reg = ModelRegistry(tmp_path / "reg")
    old = _fake_run(tmp_path / "old", image_size=64)
    reg.publish({m: RunPaths.of(old).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")},
                preset("tiny").with_overrides(image_size=64), {"digest": "older"}, metrics={})
    champion = reg.resolve()
    report = _report({"dice": 0.5, "cldice": 0.5}, {"ssim": 0.5, "psnr": 20.0})
    decision = decide_promotion(run_dir, config, report, champion, log=lambda _m: None)
    assert decision.promote and any("64 px" in note and champion.version in note for note in decision.notes)


# ------------------------------------------------------------------------------------ the retrain artifact


def _retrain_result(promoted: bool) -> dict:
    return {
        "status": "retrained" if promoted else "published", "version": "v0002-20260101T000000Z",
        "previous_version": "v0001-20250101T000000Z", "promoted": promoted,
        "latest": "v0002-20260101T000000Z" if promoted else "v0001-20250101T000000Z",
        "promotion": {"promote": promoted, "summary": "all 3 quality bars met; not worse than latest"
                      if promoted else "2 bars missed (pix2pix_beats_baselines, crgan_beats_baselines)",
                      "reasons": [] if promoted else ["2 bars missed (pix2pix_beats_baselines, crgan_beats_baselines)"],
                      "bars": {"pix2pix_beats_baselines": promoted, "crgan_beats_baselines": promoted,
                               "crgan_patient_specific": True},
                      "champion": "v0001-20250101T000000Z",
                      "comparison": {"pix2pix": {"dice": {"challenger": 0.236, "champion": 0.3},
                                                 "cldice": {"challenger": 0.2, "champion": 0.25}}}},
        "scores": {"pix2pix": {"model": {"dice": 0.236, "cldice": 0.2},
                               "baselines": {"otsu": {"dice": 0.549, "cldice": 0.5},
                                             "frangi": {"dice": 0.4, "cldice": 0.41},
                                             "segmenter": {"dice": 0.6, "cldice": 0.62}}},
                   "crgan": {"model": {"ssim": 0.31, "psnr": 17.5},
                             "baselines": {"nearest": {"ssim": 0.4, "psnr": 18.0},
                                           "neighbour_mean": {"ssim": 0.42, "psnr": 18.2}},
                             "own_vs_other_ssim": {"own": 0.5, "other": 0.4, "n_cases": 3}}},
        "warnings": ["quality bar not met: pix2pix_beats_baselines (...)"] if not promoted else [],
        "soul_dir": "/data/soul", "registry_dir": "/data/reg", "seconds": 12.0,
    }


def test_the_retrain_artifact_shows_scores_beside_baselines_the_bars_and_the_decision():
    from tasks.rendering.artifacts import retrain_markdown

    text = retrain_markdown(_retrain_result(promoted=False))
    assert text.startswith("# retrain: published v0002-20260101T000000Z, not promoted")
    assert "2 bars missed (pix2pix_beats_baselines, crgan_beats_baselines)" in text
    assert "`latest` stays v0001-20250101T000000Z" in text
    for name, value in (("otsu", "0.549"), ("frangi", "0.400"), ("segmenter", "0.600"), ("nearest", "0.400"),
                        ("neighbour_mean", "0.420"), ("Pix2Pix", "0.236"), ("CRGAN", "0.310")):
        assert any(name in line and value in line for line in text.splitlines()), (name, value)
    assert "latest v0001-20250101T000000Z (same data)" in text
    # the bars come right after the decision, above the WARNINGs and the score tables (the first screen of the
    # UI's artifact page), each beside the numbers it compared: this retrain's and the best baseline's
    lines = text.splitlines()
    bars = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "_" in line.split("|")[1]}
    assert "**NOT MET**" in bars["pix2pix_beats_baselines"] and "| met |" in bars["crgan_patient_specific"]
    assert lines.index(bars["pix2pix_beats_baselines"]) < min(
        i for i, line in enumerate(lines) if line.startswith("**WARNING**") or line.startswith("## Pix2Pix"))
    assert all(s in bars["pix2pix_beats_baselines"] for s in ("0.236", "0.600 (segmenter)", "0.620 (segmenter)"))
    assert all(s in bars["crgan_beats_baselines"] for s in ("0.310", "17.50", "0.420 (neighbour_mean)", "18.20"))
    assert "0.500" in bars["crgan_patient_specific"] and "0.400" in bars["crgan_patient_specific"]
    promoted = retrain_markdown(_retrain_result(promoted=True))
    assert promoted.startswith("# retrain: retrained") and "**Promoted**" in promoted and "NOT MET" not in promoted
    # with no latest at all, augment does not 'keep using' anything: it trains its own models
    first = retrain_markdown({**_retrain_result(promoted=False), "previous_version": None, "latest": None})
    assert "keep using" not in first and "no version is `latest` yet" in first.lower()
    assert "augment runs train their own models" in first


def test_the_retrain_final_state_names_a_version_that_was_not_promoted_in_the_runs_list(monkeypatch):
    """The runs list shows the state's name only: a retrain that published without promoting must not read as
    the same plain 'Completed' as a promoted one or one that found nothing to do; its message says why once,
    and the last log line (a WARNING) names the version's report."""
    import flows.final_state
    from flows.retrain import retrain_final_state

    logged: list[tuple[str, int]] = []
    monkeypatch.setattr(flows.final_state, "run_log", lambda message, level: logged.append((message, level)))

    why = "2 bars missed (pix2pix_beats_baselines, crgan_beats_baselines)"
    warnings = ["quality bar not met: pix2pix_beats_baselines (...); see /data/reg/models/v0002/report.md",
                "quality bar not met: crgan_beats_baselines (...); see /data/reg/models/v0002/report.md",
                "published v0002-20260101T000000Z, not promoted: ...; latest stays v0001-20250101T000000Z"]
    result = {**_retrain_result(promoted=False), "warnings": warnings,
              "message": f"published v0002-20260101T000000Z, not promoted: {why}"}
    state = retrain_final_state(result)
    assert state.is_completed() and state.name == "Completed: not promoted, 2 bars missed"
    assert state.message == f"published v0002-20260101T000000Z, not promoted: {why}; 3 warnings"
    assert state.data is result
    assert logged == [(f"Completed: not promoted, 2 bars missed - {state.message}; "
                       "see /data/reg/models/v0002-20260101T000000Z/report.md", logging.WARNING)]

    # bars met, but below latest on the same held-out data: still named, without a bar count
    worse = {**result, "promotion": {**result["promotion"], "bars": dict.fromkeys(result["promotion"]["bars"], True)},
             "warnings": warnings[2:], "message": "published v0002-20260101T000000Z, not promoted: pix2pix test Dice "
                                                  "0.2360 < latest v0001-20250101T000000Z's 0.3000 on this run's ..."}
    assert retrain_final_state(worse).name == "Completed: not promoted"

    promoted = {**_retrain_result(promoted=True), "warnings": [],
                "message": "retrained: latest -> v0002-20260101T000000Z (was v0001-20250101T000000Z); all 3 quality "
                           "bars met; not worse than latest"}
    state = retrain_final_state(promoted)
    assert state.name == "Completed" and state.message == promoted["message"]
    few = retrain_final_state({**promoted, "warnings": ["only 1 held-out test patient(s): ..."]})
    assert few.name == "Completed: 1 warning" and few.message == f"{promoted['message']}; 1 warning"

    unchanged = {"status": "no change", "version": "v0002-20260101T000000Z", "promoted": True,
                 "registry_dir": "/data/reg", "message": "no change since v0002-20260101T000000Z: nothing to retrain"}
    state = retrain_final_state(unchanged)
    assert state.name == "Completed" and state.message == unchanged["message"]


# ------------------------------------------------------------------------------------ retrain: preflight


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` made read-only for this process: chmod for a normal user, the immutable flag for root (which
    ignores permission bits); skips where neither holds."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        undo = ["chmod", "755", str(path)]
    else:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory read-only here (root without chattr)")
        undo = ["chattr", "-i", str(path)]
    try:
        try:
            (path / ".probe").write_text("x")
            (path / ".probe").unlink()
            pytest.skip("the directory is still writable")
        except OSError:
            pass
        yield path
    finally:
        subprocess.run(undo, check=True)


def _phantom_and_registry(tmp_path: Path) -> tuple[Path, Path, str]:
    """A 2-patient phantom and a registry whose latest was trained on exactly it (so: no change)."""
    from flows.retrain import config_fingerprint, make_config, source_fingerprint
    from flows.phantom import PhantomConfig, generate_phantom

    soul, reg_dir = tmp_path / "soul", tmp_path / "reg"
    generate_phantom(soul, PhantomConfig(n_patients=2, seed=0, image_size=64))
    config = make_config("tiny")
    source = {**source_fingerprint(soul, reg_dir).to_dict(), "config_hash": config_fingerprint(config)}
    run = _fake_run(tmp_path / "run")
    checkpoints = {m: RunPaths.of(run).checkpoints(m) / "best.pt" for m in ("pix2pix", "crgan")}
    version = ModelRegistry(reg_dir).publish(checkpoints, config, source, metrics={})
    return soul, reg_dir, version


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("force", [False, True])
def test_retrain_on_a_read_only_registry_is_one_line_in_preflight(tmp_path, monkeypatch, force):
    """Even with nothing to retrain (force False), and before ingest when there is (force True)."""
    import tasks.ingest
    from flows.retrain import retrain

    def ingest_must_not_run(*args, **kwargs):
        raise AssertionError("ingest ran before the registry was checked")

    monkeypatch.setattr(tasks.ingest, "ingest", ingest_must_not_run)
    soul, reg_dir, _ = _phantom_and_registry(tmp_path)
    with _read_only(reg_dir):
        with pytest.raises(BrvoError) as exc:
            retrain(soul_dir=str(soul), registry_dir=str(reg_dir), preset="tiny", force=force)
    text = _one_line(exc)
    assert text.startswith(f"model registry {reg_dir} is not writable") and "registry_dir" in text


def test_registry_refusals_come_in_preflight(tmp_path):
    from tasks.shared.preflight import preflight_registry

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(BrvoError) as exc:
        preflight_registry(tmp_path / "file")
    assert "is not a directory" in _one_line(exc)
    reg = ModelRegistry(tmp_path / "reg")
    _publish(reg, _fake_run(tmp_path / "run"))
    (reg.root / "latest").write_text("")
    with pytest.raises(BrvoError) as exc:
        preflight_registry(reg.root)
    assert "'latest' pointer" in _one_line(exc)
    (reg.root / "latest").unlink()
    assert preflight_registry(reg.root) is None and not list(reg.root.glob(".probe*"))


# ------------------------------------------------------------------------------------ retrain: the flow, end to end


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_retrain_whose_models_miss_their_bars_publishes_without_promoting_and_says_why(
        tiny_phantom, tmp_path, monkeypatch):
    """The tiny preset's one-epoch models lose to their baselines: the version is published (its files say why)
    but `latest` does not move; the state message, the artifact and every WARNING say so, and no WARNING points
    into REGISTRY/work, which the retrain deletes."""
    import flows.retrain
    import tasks.engine.logs
    from tasks.rendering.artifacts import retrain_markdown
    from flows.retrain import retrain

    warnings: list[str] = []
    monkeypatch.setattr(tasks.engine.logs, "run_warning", warnings.append)
    monkeypatch.setattr(flows.retrain, "run_warning", warnings.append)
    reg_dir = tmp_path / "reg"
    state = retrain(soul_dir=str(tiny_phantom), registry_dir=str(reg_dir), preset="tiny", return_state=True)
    result = state.result()
    registry = ModelRegistry(reg_dir)
    version = result["version"]
    missed = [bar for bar, met in result["promotion"]["bars"].items() if not met]
    assert missed and registry.versions() == [version] and registry.latest_version() is None
    assert result["status"] == "published" and result["promoted"] is False
    bars_missed = f"{len(missed)} bar{'s' if len(missed) > 1 else ''} missed"
    assert result["message"] == f"published {version}, not promoted: {bars_missed} ({', '.join(missed)})"
    # the runs list shows the name: not the plain 'Completed' of a promotion
    assert state.is_completed() and state.name == f"Completed: not promoted, {bars_missed}"
    assert state.message == f"{result['message']}; {len(result['warnings'])} warning" + (
        "s" if len(result["warnings"]) > 1 else "")
    vdir = registry.models_dir / version
    recorded = json.loads((vdir / "promotion.json").read_text())
    assert recorded["promoted"] is False and recorded["bars"] == result["promotion"]["bars"]
    assert (vdir / "report.json").is_file() and (vdir / "report.md").is_file()
    assert json.loads((vdir / "metrics.json").read_text())["pix2pix"]["checkpoint"]["path"] == str(vdir / "pix2pix.pt")
    assert not (reg_dir / "work").exists() or not any((reg_dir / "work").iterdir())
    assert warnings and not [w for w in warnings if str(reg_dir / "work") in w], warnings
    assert any(f"published {version}, not promoted" in w for w in warnings)
    assert all(any(bar in w and str(vdir / "report.md") in w for w in warnings) for bar in missed), warnings
    markdown = retrain_markdown(result)
    assert markdown.startswith(f"# retrain: published {version}, not promoted") and "**NOT MET**" in markdown
    assert "otsu" in markdown and "neighbour_mean" in markdown

    # the same data and config again: nothing to retrain, and the answer says the newest version was not promoted
    again = retrain(soul_dir=str(tiny_phantom), registry_dir=str(reg_dir), preset="tiny", return_state=True)
    assert again.result()["status"] == "no change" and registry.versions() == [version]
    assert again.message.startswith(f"no change since {version} (not promoted: ") and again.name == "Completed"

    # models that meet their bars (here: bars declared met) with no latest to beat are promoted, and say so
    import tasks.analyses.promotion

    monkeypatch.setattr(tasks.analyses.promotion, "bar_checks", lambda report: {"pix2pix_beats_baselines": True})
    forced = retrain(soul_dir=str(tiny_phantom), registry_dir=str(reg_dir), preset="tiny", force=True,
                     return_state=True)
    promoted = forced.result()
    assert promoted["status"] == "retrained" and promoted["promoted"] is True
    assert registry.latest_version() == promoted["version"] != version
    assert promoted["message"] == (f"retrained: latest -> {promoted['version']} (was none); all 1 quality bar met; "
                                   "no latest to compare with")
    assert forced.message.startswith(promoted["message"]) and "not promoted" not in forced.name
    assert registry.resolve().promotion["promoted"] is True


def test_a_refusal_after_prefect_started_is_still_the_last_line_of_stderr(tmp_path, tiny_phantom):
    """`run` with an empty `latest`: Prefect's flow (and its background event worker) has started when
    the registry is refused, and that worker used to log 'Still processing items ...' at exit, after
    the error line, so the user read Prefect's warning as the outcome."""
    import os

    reg = ModelRegistry(tmp_path / "reg")
    _publish(reg, _fake_run(tmp_path / "fake_run"))
    (reg.root / "latest").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(BRVO_REGISTRY_DIR=str(reg.root), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tiny_phantom), str(tmp_path / "run"),
                           "--preset", "tiny"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: ") and "'latest' pointer" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
