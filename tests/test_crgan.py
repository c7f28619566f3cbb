"""CRGAN: shapes, no leak of hidden stages, learning, checkpoints/resume, generation API, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brvo_models.crgan import CRGAN, CRGANDiscriminator, CRGANGenerator, load_discriminator, load_generator
from brvo_models.crgan_data import heldout_cases, make_train_batches, pixel_noise
from brvo_models.crgan_sampling import generate, generate_batch, predict_heldout, realism
from brvo_models.pix2pix import load_labeller
from brvo_models.training import BEST, LAST
from conftest import write_blob_dataset
from storage.hashing import file_sha256
from storage.errors import BrvoError, CheckpointError, DatasetFormatError
from storage.run_dir import RunPaths
from tasks.config import preset
from tasks.crgan import evaluate_crgan, load_sequences, preflight_train_crgan, train_crgan

TINY = preset("tiny")
SIZE = TINY.image_size


def _tiny(**crgan):
    return TINY.with_overrides(device="cpu", **{f"crgan.{k}": v for k, v in crgan.items()})


def _run_dir(tmp_path: Path, name: str = "run", **kw) -> Path:
    run = tmp_path / name
    run.mkdir(parents=True, exist_ok=True)
    write_blob_dataset(run / "soul.h5", **{"n_patients": 8, "image_size": SIZE, **kw})
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for 2 fixed epochs (shared by the read-only tests below)."""
    run = _run_dir(tmp_path_factory.mktemp("crgan"))
    config = _tiny(epochs=2)
    result = train_crgan(run, config, log=lambda _m: None)
    return run, config, result


def _inputs(B=2, N=5, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.rand(B, 6, 1, size, size, generator=g) * 2 - 1
    vis = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)[:B]
    sel_b = torch.tensor([0, 0, 1, 1, 0])[:N]
    sel_t = torch.tensor([1, 2, 0, 5, 3])[:N]
    return ctx, vis, torch.tensor([0, 3])[:B], torch.randn(B, TINY.crgan.z_dim, generator=g), \
        pixel_noise(N, size, g), sel_b, sel_t


def test_shapes_and_ranges():
    c = TINY.crgan
    gen, disc = CRGANGenerator(c, SIZE, 4).eval(), CRGANDiscriminator(c, SIZE, 4).eval()
    ctx, vis, pat, z, pix, sel_b, sel_t = _inputs()
    with torch.no_grad():
        out = gen(ctx, vis, pat, z, pix, sel_b, sel_t)
        logits = disc(out, sel_t, pat[sel_b])
    assert out.shape == (5, 1, SIZE, SIZE) and out.abs().max() <= 1
    assert logits.shape[:2] == (5, 1) and logits.shape[2] >= 2  # a patch map, not one logit
    gen64 = CRGANGenerator(c, 64, 4).eval()
    with torch.no_grad():
        assert gen64(*_inputs(size=64)).shape == (5, 1, 64, 64)
    with pytest.raises(ValueError):
        CRGANGenerator(c, 48, 4)


def test_hidden_stage_never_leaks():
    """Whatever a hidden (not visible) stage's image holds, no output changes."""
    c = TINY.crgan
    gen = CRGANGenerator(c, SIZE, 4)
    for p in gen.parameters():  # make every path (incl. noise injection) matter
        torch.nn.init.normal_(p, 0.0, 0.2)
    gen.eval()
    ctx, vis, pat, z, pix, sel_b, sel_t = _inputs()
    with torch.no_grad():
        ref = gen(ctx, vis, pat, z, pix, sel_b, sel_t)
        poisoned = ctx.clone()
        poisoned[~vis] = torch.rand_like(poisoned[~vis]) * 2 - 1
        assert torch.equal(gen(poisoned, vis, pat, z, pix, sel_b, sel_t), ref)
        changed = ctx.clone()
        changed[0, 2] = -changed[0, 2]  # a *visible* stage does matter
        assert not torch.equal(gen(changed, vis, pat, z, pix, sel_b, sel_t), ref)


def test_training_batches_hide_stages_and_held_out_prediction_ignores_them(blob_h5):
    seqs = load_sequences(blob_h5)
    train = [s for s in seqs if s.split == "train"]
    cfg = TINY.crgan.model_copy(update={"hide_prob": 0.6})
    batches = make_train_batches(train, cfg, seed=0, epoch=0)
    again = make_train_batches(train, cfg, seed=0, epoch=0)
    n_hidden = 0
    for b, b2 in zip(batches, again):
        assert np.array_equal(b["context"], b2["context"]) and b["noise_seed"] == b2["noise_seed"]
        for i, (sb, st, hid) in enumerate(zip(b["sel_b"], b["sel_t"], b["hidden"])):
            assert b["visible"][sb, st] == (not hid)
            if hid:
                n_hidden += 1
                assert not b["context"][sb, st].any()
        assert b["visible"].any(axis=1).all()  # every sequence keeps some context
    assert n_hidden > 0
    # Held-out prediction: the hidden stage's own images cannot change its prediction.
    gen = CRGANGenerator(TINY.crgan, SIZE, len(train))
    case = heldout_cases([s for s in seqs if s.split in ("val", "test")])[0]
    seq, stage = case
    before = predict_heldout(gen, [case], seeds=[None, 3], device="cpu")
    seq.images[stage] = 255 - seq.images[stage]
    after = predict_heldout(gen, [case], seeds=[None, 3], device="cpu")
    assert np.array_equal(before, after)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(blob_h5):
    torch.manual_seed(0)
    seqs = load_sequences(blob_h5)
    train = [s for s in seqs if s.split == "train"]
    cfg = TINY.crgan.model_copy(update={"lr_g": 1e-3})
    model = CRGAN(cfg, SIZE, [s.patient_id for s in train])
    batch = make_train_batches(train, cfg, seed=0, epoch=0)[0]
    with torch.no_grad():
        first = model.losses(batch)
    for _ in range(10):
        model.train_step(batch)
    with torch.no_grad():
        last = model.losses(batch)
    l1 = lambda d: float(d["l1_hidden"] + d["l1_visible"])  # noqa: E731
    assert l1(last) < 0.8 * l1(first)


def test_checkpoint_round_trip_and_generation_api(trained):
    run, config, result = trained
    best = Path(result.best_path)
    assert best.exists() and (best.parent / LAST).exists() and result.epochs == 2
    assert file_sha256(best) == result.best_sha256
    gen, index, device = load_generator(best, "cpu", SIZE)
    train_ids = [s.patient_id for s in load_sequences(run / "soul.h5") if s.split == "train"]
    assert list(index) == train_ids and index[train_ids[1]] == 1
    state = torch.load(best, weights_only=True)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, state["modules"]["generator"][k])
    context = {0: np.full((2, SIZE, SIZE), 90, np.uint8), 2: np.full((1, SIZE, SIZE), 120, np.uint8)}
    a = generate(gen, context, 0, [1, 3, 5], 3, [11, 12, 13], device)
    b = generate(gen, context, 0, [1, 3, 5], 3, [11, 12, 13], device)
    assert a.shape == (3, 3, SIZE, SIZE) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # deterministic for the seeds
    per_image = [[sd + 100 * s for sd in (1, 2)] for s in (1, 3)]
    c1 = generate(gen, context, None, [1, 3], 2, per_image, device)
    assert c1.shape == (2, 2, SIZE, SIZE)
    assert np.array_equal(c1, generate(gen, context, None, [1, 3], 2, per_image, device))
    # different seeds -> different samples (compared before quantisation)
    ctx = np.zeros((2, 6, SIZE, SIZE), np.float32)
    ctx[:, 0], counts = 0.4, np.array([[2.0] + [0.0] * 5] * 2)
    x, y = generate_batch(gen, ctx, counts, [None, None], [[2], [2]], [1, 2], device)
    assert not torch.equal(x, y)
    disc, index_d, _ = load_discriminator(best, "cpu")
    assert index_d == index
    p = realism(disc, a.reshape(-1, SIZE, SIZE), [1, 1, 1, 3, 3, 3, 5, 5, 5], [0] * 6 + [None] * 3, "cpu")
    assert p.shape == (9,) and p.dtype == np.float32 and ((p > 0) & (p < 1)).all()
    assert gen.config == config.crgan  # built from the config the checkpoint describes
    with pytest.raises(CheckpointError, match="image_size"):
        load_generator(best, "cpu", 64)
    with pytest.raises(CheckpointError, match="model"):  # a CRGAN checkpoint is no labeller
        load_labeller(best, "cpu")


def test_resume_after_a_kill_mid_schedule_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # 4 train patients at batch 3: 2 steps per epoch; adaptive, 7 steps, a validation every 3 -> kills mid-epoch
    config = _tiny(batch_size=3, schedule="adaptive", epochs=1, min_steps=7, max_steps=7, val_every=3, patience=2)
    straight = _run_dir(tmp_path, "straight")
    done = train_crgan(straight, config, log=lambda _m: None)
    resumed = _run_dir(tmp_path, "resumed")
    first = train_crgan(resumed, config, log=lambda _m: None, max_validations_this_call=1)
    assert first.steps == 3 and first.epochs == 1.5
    torch.manual_seed(12345)  # a fresh process would have another RNG state: resume must restore it
    second = train_crgan(resumed, config, log=lambda _m: None)
    assert second.resumed_from_step == 3 and second.steps == done.steps == 7
    a = torch.load(RunPaths.of(straight).checkpoints("crgan") / LAST, weights_only=True)
    b = torch.load(RunPaths.of(resumed).checkpoints("crgan") / LAST, weights_only=True)
    for module in ("generator", "discriminator"):
        for k, v in a["modules"][module].items():
            assert torch.equal(v, b["modules"][module][k]), f"{module}.{k} differs after resume"


def test_evaluate_returns_the_heldout_section(trained):
    run, config, _ = trained
    section = evaluate_crgan(run, config, log=lambda _m: None)
    assert json.loads(json.dumps(section)) == section  # JSON as it is (report.json stores it)
    h = section["heldout"]
    assert h["n"] == len(heldout_cases(s for s in load_sequences(run / "soul.h5") if s.split in ("val", "test")))
    for table in (h["model"], h["baselines"]["nearest"], h["baselines"]["neighbour_mean"]):
        assert set(table) == {"mse", "psnr", "ssim", "cosine"}
    assert h["per_stage"] and all({"n", "model", "nearest", "neighbour_mean"} <= set(v) for v in h["per_stage"].values())
    # every held-out case is in exactly one gap kind, and each kind says how much of the course it carries
    assert sum(g["n"] for g in h["per_gap"].values()) == h["n"]
    assert all({"model", "nearest", "neighbour_mean", "course"} <= set(g) for g in h["per_gap"].values())
    q = section["sample_quality"]
    assert q["diversity"] >= 0 and {"own", "other"} <= set(q["own_vs_other_ssim"])


# ---------------------------------------------------------------------------------- bad input


def test_missing_and_invalid_soul_h5(tmp_path):
    with pytest.raises(BrvoError, match="run preprocess first"):
        preflight_train_crgan(tmp_path, _tiny())
    (tmp_path / "soul.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DatasetFormatError, match="not a readable HDF5"):
        preflight_train_crgan(tmp_path, _tiny())


def test_too_few_patients_for_a_held_out_split(tmp_path):
    run = tmp_path / "few"
    run.mkdir()
    write_blob_dataset(run / "soul.h5", n_patients=3, image_size=SIZE)
    with pytest.raises(BrvoError, match="at least 2 train patients"):
        preflight_train_crgan(run, _tiny())


def test_image_size_mismatch_with_the_data(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(BrvoError, match="re-run preprocess"):
        preflight_train_crgan(run, _tiny().with_overrides(image_size=64))


def test_checkpoint_from_another_config_or_image_size_is_refused_untouched(trained, tmp_path):
    run0, config, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(run0, run)
    ckpts = RunPaths.of(run).checkpoints("crgan")
    before = {p.name: file_sha256(p) for p in ckpts.iterdir()}
    with pytest.raises(CheckpointError, match="config_hash"):
        train_crgan(run, _tiny(epochs=2, z_dim=4), log=lambda _m: None)
    # the same run re-preprocessed at 64 px: the 32 px checkpoint is refused
    (run / "soul.h5").unlink()
    write_blob_dataset(run / "soul.h5", n_patients=8, image_size=64)
    with pytest.raises(CheckpointError, match="image_size"):
        preflight_train_crgan(run, _tiny(epochs=2).with_overrides(image_size=64))
    assert {p.name: file_sha256(p) for p in ckpts.iterdir()} == before


def test_interrupted_checkpoint_is_refused_and_nothing_overwritten(trained, tmp_path):
    run0, config, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(run0, run)
    ckpts = RunPaths.of(run).checkpoints("crgan")
    last = ckpts / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    best_sha = file_sha256(ckpts / BEST)
    with pytest.raises(CheckpointError, match="interrupted"):
        preflight_train_crgan(run, config)
    with pytest.raises(CheckpointError, match="interrupted"):
        train_crgan(run, config, log=lambda _m: None)
    assert file_sha256(ckpts / BEST) == best_sha
    (ckpts / "last.pt.sha256").unlink()  # truncated and no digest to compare: unverifiable, refused (issue 15)
    with pytest.raises(CheckpointError, match="sidecar"):
        preflight_train_crgan(run, config)
    (ckpts / "last.pt.sha256").write_text(file_sha256(last) + "\n")  # re-signed: still not a loadable file
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        preflight_train_crgan(run, config)


def test_batches_made_ahead_in_a_thread_train_the_same_weights(tmp_path, monkeypatch):
    """fit's prefetch (on by default on CUDA): staged batches on CPU, forced here, change no bit."""
    from functools import partial

    import tasks.crgan
    from brvo_models.training import fit

    config = _tiny(epochs=2)
    plain = train_crgan(_run_dir(tmp_path, "plain"), config, log=lambda _m: None)
    monkeypatch.setattr(tasks.crgan, "fit", partial(fit, prefetch=2))
    ahead = train_crgan(_run_dir(tmp_path, "ahead"), config, log=lambda _m: None)
    a, b = (torch.load(r.checkpoint_dir + "/" + LAST, weights_only=True) for r in (plain, ahead))
    for module in ("generator", "discriminator"):
        for k, v in a["modules"][module].items():
            assert torch.equal(v, b["modules"][module][k]), f"{module}.{k}"
    assert [r["loss_g"] for r in plain.history] == [r["loss_g"] for r in ahead.history]


def _density_losses(blob_h5, **density):
    """(model with the density term on, a batch, its losses with the term, without it, the config without)."""
    seqs = load_sequences(blob_h5)
    train = [s for s in seqs if s.split == "train"]
    off = TINY.crgan.model_copy(update={"lambda_adv": 0.0})  # the spectral norm's power step changes D per call
    on = off.model_copy(update={"lambda_density": 100.0, **density})
    batch = make_train_batches(train, off, seed=0, epoch=0)[0]
    torch.manual_seed(0)
    model = CRGAN(on, SIZE, [s.patient_id for s in train])
    with torch.no_grad():
        with_term = model.losses(batch)
        model.config = off
        without = model.losses(batch)
        model.config = on
    return model, batch, with_term, without, off


def test_the_density_term_is_off_by_default_and_when_on_trains_the_estimates_density(blob_h5):
    """lambda_density: 0 leaves the generator loss as it was; on, it adds lambda x (hidden + w x visible)
    density error, and steps on it alone bring the estimate's vessel density to the stage mean's."""
    model, batch, with_term, without, off = _density_losses(blob_h5)
    assert "density_hidden" not in without
    expected = 100.0 * (with_term["density_hidden"] + off.visible_l1_weight * with_term["density_visible"])
    assert float(with_term["loss_g"] - without["loss_g"]) == pytest.approx(float(expected), rel=1e-4)

    only_density = off.model_copy(update={"lambda_density": 100.0, "lambda_l1": 0.0, "lr_g": 1e-3})
    torch.manual_seed(0)
    model = CRGAN(only_density, SIZE, model.patient_ids)
    error = lambda d: float(d["density_hidden"] + d["density_visible"])  # noqa: E731
    with torch.no_grad():
        first = error(model.losses(batch))
    for _ in range(40):
        model.train_step(batch)
    with torch.no_grad():
        last = error(model.losses(batch))
    assert first > 0.01 and last < 0.5 * first


def test_the_change_density_term_compares_hidden_stage_pairs_and_ignores_a_shared_bias(blob_h5):
    """density_target 'change': the loss adds lambda x density_change, the mean over pairs of hidden stages
    of one sequence; estimates that equal their targets up to one brightness offset shared by all of them
    score lower on it than on the level term (the shared part cancels)."""
    model, batch, with_term, without, _ = _density_losses(blob_h5, density_target="change")
    assert float(with_term["loss_g"] - without["loss_g"]) == pytest.approx(
        100.0 * float(with_term["density_change"]), rel=1e-4)

    t = model.stage(batch)
    shifted = (t["targets"] + 0.2).clamp(-1, 1)  # every estimate 0.1 brighter (on [0, 1]) than its target
    assert bool(t["hidden"].any())
    with torch.no_grad():
        change_err = float(model._g_losses(t, shifted, shifted)["density_change"])
        model.config = model.config.model_copy(update={"density_target": "level"})
        level_err = float(model._g_losses(t, shifted, shifted)["density_hidden"])
    assert level_err > 0.05 and change_err < 0.5 * level_err
