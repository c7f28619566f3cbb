"""Pix2Pix: architecture, optimisation, labelling, checkpoints, exact resume and bad input (issue 3)."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from brvo_models.configs import Pix2PixConfig
from brvo_models.pix2pix import (PatchDiscriminator, Pix2Pix, UnetGenerator, aligned_augment, build_generator,
                                 label_images, load_labeller, objective_text)
from brvo_models.training import Schedule
from storage.checkpoints import load_checkpoint
from storage.hashing import file_sha256
from storage.errors import BrvoError, CheckpointError, DatasetFormatError
from storage.run_dir import RunPaths
from tasks.config import preset
from tasks.engine import StepContext
from tasks.pix2pix import (Pix2PixResult, evaluate_pix2pix, load_split, mask_scores, preflight_train_pix2pix,
                                 train_pix2pix, train_pix2pix_step)
from conftest import write_blob_dataset

TINY = preset("tiny").with_overrides(**{"pix2pix.epochs": 2})


def _quiet(_msg: str) -> None:
    pass


def _run_dir(tmp_path: Path, name: str = "run", **blob) -> Path:
    run = tmp_path / name
    run.mkdir()
    write_blob_dataset(run / "soul.h5", **{"n_patients": 8, "image_size": 32, **blob})
    return run


def _ckpt(run: Path, name: str = "last.pt") -> Path:
    return RunPaths.of(run).checkpoints("pix2pix") / name


# ------------------------------------------------------------------------------ architecture


def report_flag(model) -> bool:
    return model.report_section().flip_average is True


def _innermost_conv(gen: UnetGenerator) -> nn.Conv2d:
    block = gen.model
    while True:
        inner = [m for m in block.model if m.__class__.__name__ == "UnetSkipBlock"]
        if not inner:
            return [m for m in block.model if isinstance(m, nn.Conv2d)][0]
        block = inner[0]


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_generator_shapes_and_1x1_bottleneck(size):
    gen = build_generator(Pix2PixConfig(ngf=4), size)
    seen = {}

    def hook(module, inputs, output) -> None:
        seen["shape"] = tuple(output.shape)

    _innermost_conv(gen).register_forward_hook(hook)
    x = torch.rand(1, 1, size, size) * 2 - 1
    y = gen(x)
    assert y.shape == (1, 1, size, size)
    assert y.min() >= -1 and y.max() <= 1  # Tanh
    assert seen["shape"] == (1, 4 * 8, 1, 1)
    n_dropout = sum(isinstance(m, nn.Dropout) for m in gen.modules())
    assert n_dropout == int(np.log2(size)) - 5  # the inner ngf*8 decoder blocks, as in the reference
    assert all(m.p == 0.5 for m in gen.modules() if isinstance(m, nn.Dropout))


def test_generator_rejects_sizes_without_a_1x1_bottleneck():
    with pytest.raises(ValueError, match="power-of-two"):
        build_generator(Pix2PixConfig(ngf=4), 96)


def test_patchgan_is_70x70_on_image_label_pairs():
    d = PatchDiscriminator(2, ndf=8, n_layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 2 and convs[-1].out_channels == 1
    rf = 1
    for c in reversed(convs):  # receptive field, output to input
        rf = (rf - 1) * c.stride[0] + c.kernel_size[0]
    assert rf == 70
    assert d(torch.zeros(2, 2, 64, 64)).shape == (2, 1, 6, 6)
    leaky = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.2 for m in leaky)


def test_reference_init_optimiser_and_lr_schedule():
    config = Pix2PixConfig(ngf=8, ndf=8, epochs=10, decay_fraction=0.4)
    model = Pix2Pix(config, 32)
    conv_w = torch.cat([m.weight.flatten() for m in model.G.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv_w.mean().item()) < 0.005 and conv_w.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.opt_G.defaults["lr"] == 2e-4 and model.opt_G.defaults["betas"] == (0.5, 0.999)
    schedule = Schedule.from_config(config, steps_per_epoch=3)  # fixed, the reference: lr set per epoch
    factors = [schedule.lr_factor(3 * e + 1) for e in range(10)]
    assert factors[:6] == [1.0] * 6  # constant, then linear decay towards 0
    assert factors[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert isinstance(model.gan_loss, nn.BCEWithLogitsLoss)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Pix2Pix(Pix2PixConfig(ngf=8, ndf=8), 32)
    label = torch.zeros(4, 1, 32, 32)
    label[:, :, 10:13, :] = 1
    label[:, :, :, 20:22] = 1
    image = label * 0.6 + 0.2 + 0.05 * torch.randn(label.shape)
    batch = (image * 2 - 1, label * 2 - 1)
    losses = [model.train_step(batch)["G_L1"] for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.93 * losses[0]  # lr 2e-4: slow but steady


def test_reference_objective_unless_lambda_dice_is_set():
    torch.manual_seed(0)
    batch = (torch.rand(2, 1, 32, 32) * 2 - 1, (torch.rand(2, 1, 32, 32) > 0.8).float() * 2 - 1)
    assert "G_Dice" not in Pix2Pix(Pix2PixConfig(ngf=4, ndf=4), 32).train_step(batch)
    losses = Pix2Pix(Pix2PixConfig(ngf=4, ndf=4, lambda_dice=5.0), 32).train_step(batch)
    assert 0.0 < losses["G_Dice"] <= 5.0
    assert "G_BCE" not in losses
    assert 0.0 < Pix2Pix(Pix2PixConfig(ngf=4, ndf=4, lambda_bce=2.0), 32).train_step(batch)["G_BCE"]


def _generator_after_one_step(config: Pix2PixConfig, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = Pix2Pix(config, 32)
    model.train_step(batch)
    return {k: v.clone() for k, v in model.G.state_dict().items()}


def test_objective_weights_change_what_the_generator_learns():
    """lambda_gan scales the adversarial gradient (0: G trains on its supervised terms alone), lambda_bce adds one."""
    torch.manual_seed(0)
    batch = (torch.rand(2, 1, 32, 32) * 2 - 1, (torch.rand(2, 1, 32, 32) > 0.8).float() * 2 - 1)
    base = dict(ngf=4, ndf=4, dropout=False)
    reference = _generator_after_one_step(Pix2PixConfig(**base), batch)
    again = _generator_after_one_step(Pix2PixConfig(**base), batch)
    no_gan = _generator_after_one_step(Pix2PixConfig(**base, lambda_gan=0.0), batch)
    with_bce = _generator_after_one_step(Pix2PixConfig(**base, lambda_bce=10.0), batch)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(reference, again)
    assert not same(reference, no_gan) and not same(reference, with_bce)


def test_objective_text_names_every_term_outside_the_reference():
    assert objective_text(Pix2PixConfig()) == "BCE PatchGAN + 100 x L1 (the reference pix2pix objective)"
    text = objective_text(Pix2PixConfig(lambda_gan=0.1, lambda_dice=1000, lambda_bce=50))
    assert text == ("0.1 x BCE PatchGAN + 100 x L1 + 1000 x soft Dice + 50 x pixel BCE "
                    "(not in the reference pix2pix)")


# -------------------------------------------------------------------------------- labelling


def test_label_images_probabilities_masks_and_eval_mode():
    torch.manual_seed(0)
    gen = build_generator(Pix2PixConfig(ngf=4), 32)
    gen.train()
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32), dtype=np.uint8)
    probs, masks = label_images(gen, images, threshold=0.5, batch_size=3)
    assert probs.shape == masks.shape == (7, 32, 32)
    assert probs.dtype == np.float32 and masks.dtype == np.uint8
    assert probs.min() >= 0 and probs.max() <= 1
    assert set(np.unique(masks)) <= {0, 1}
    assert np.array_equal(masks, (probs > 0.5).astype(np.uint8))
    assert gen.training  # mode restored
    # eval mode: no dropout, running BN stats -> independent of how images are batched
    probs_all, _ = label_images(gen, images, threshold=0.5, batch_size=64)
    np.testing.assert_allclose(probs, probs_all, atol=1e-5)
    # threshold=None: the one stored with the generator (chosen on validation patients) is used
    gen.label_threshold.fill_(0.3)
    _, masks_stored = label_images(gen, images)
    assert np.array_equal(masks_stored, (probs > 0.3).astype(np.uint8))
    empty_p, empty_m = label_images(gen, np.zeros((0, 32, 32), np.uint8))
    assert empty_p.shape == (0, 32, 32) and empty_m.dtype == np.uint8


def test_flip_averaged_labels_are_the_mean_of_the_four_flipped_passes():
    torch.manual_seed(0)
    gen = build_generator(Pix2PixConfig(ngf=4, flip_average=True), 32)
    assert gen.flip_average
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    single, _ = label_images(gen, images, threshold=0.5, flip_average=False)
    passes = [np.flip(label_images(gen, np.ascontiguousarray(np.flip(images, axes)), 0.5, flip_average=False)[0],
                      axes) for axes in ((1,), (2,), (1, 2))]
    expected = (single + sum(passes)) / 4
    averaged, masks = label_images(gen, images, threshold=0.5)  # None: follows the generator's own setting
    np.testing.assert_allclose(averaged, expected, atol=1e-6)
    assert np.abs(averaged - single).max() > 1e-3  # an untrained generator is not flip-equivariant
    assert np.array_equal(masks, (averaged > 0.5).astype(np.uint8))
    # the average of a flipped image is the flipped average: the label does not depend on orientation
    flipped, _ = label_images(gen, np.ascontiguousarray(images[:, :, ::-1]), threshold=0.5)
    np.testing.assert_allclose(flipped[:, :, ::-1], averaged, atol=1e-5)


def test_aligned_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    label = torch.from_numpy((rng.random((16, 1, 32, 32)) < 0.2).astype(np.float32))
    label[:, :, 4:8, 2:30] = 1  # an asymmetric bar so flips are visible
    image = label.clone()  # the image *is* its label: any misalignment shows up
    g = torch.Generator().manual_seed(1)
    img_f, lab_f = aligned_augment(image, label, g, max_rotation_deg=0)
    assert torch.equal(img_f, lab_f)
    assert not torch.equal(lab_f, label)  # something was flipped
    g = torch.Generator().manual_seed(2)
    img_r, lab_r = aligned_augment(image, label, g, max_rotation_deg=10)
    assert set(torch.unique(lab_r).tolist()) <= {0.0, 1.0}  # nearest neighbour for labels
    agree = ((img_r > 0.5) == (lab_r > 0.5)).float().mean().item()
    assert agree > 0.95
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(aligned_augment(image, label, g1)[1], aligned_augment(image, label, g2)[1])


# ------------------------------------------------------------------ training, checkpoints, resume


def test_step_trains_checkpoints_and_evaluates_held_out(tmp_path):
    run = _run_dir(tmp_path)
    preprocess = SimpleNamespace(path=str(RunPaths.of(run).soul_h5))  # the preprocess result it trains on
    model = train_pix2pix_step(StepContext(run_dir=run, config=TINY, log=_quiet, key="k1"), preprocess=preprocess)
    result = Pix2PixResult.model_validate(model.training)
    assert result.epochs == 2 and len(result.history) == 2
    assert {"val_dice", "val_cldice", "G_L1", "D_real", "seconds"} <= set(result.history[0])
    best = Path(result.best_path)
    assert best.exists() and (best.parent / "last.pt").exists()
    assert file_sha256(best) == result.best_sha256
    # round trip: the labeller loads exactly the stored generator weights
    gen, device = load_labeller(best, "cpu", 32)
    stored = load_checkpoint(best)["modules"]["G"]
    # the threshold chosen on validation patients at the best validation travels with the weights, and so does
    # how the labels it was chosen on were made (the tiny preset, as the demo, averages over flips)
    assert TINY.pix2pix.flip_average and gen.flip_average and report_flag(model)
    best_row = next(r for r in result.history if r["step"] == result.best_step)
    assert float(gen.label_threshold) == pytest.approx(best_row["val_threshold"])
    assert device.type == "cpu" and not gen.training
    assert all(torch.equal(v, stored[k]) for k, v in gen.state_dict().items())
    assert model.checkpoint == result.best_path and model.sha256 == result.best_sha256
    report = model.report_section().model_dump()  # the section as report.json holds it
    keys = {"dice", "iou", "cldice", "mse", "ssim", "cosine", "n"}
    assert set(report["test"]) == keys
    assert set(report["baselines"]) == {"otsu", "frangi", "segmenter"}
    # the supervised-segmenter baseline: the config's fixed budget, weights and threshold chosen on val
    seg = report["segmenter_params"]
    assert seg["steps"] == TINY.segmenter_steps and 1 <= seg["best_step"] <= seg["steps"]
    assert set(seg["flip_averaged_test"]) == keys and 0.0 < seg["flip_averaged_threshold"] < 1.0
    assert 0.0 < seg["threshold"] < 1.0 and 0.0 <= seg["best_val_dice"] <= 1.0
    assert all(set(v) == keys for v in report["baselines"].values())
    assert report["test"]["n"] == report["baselines"]["otsu"]["n"] == report["baselines"]["segmenter"]["n"] > 0
    assert report["threshold"] == pytest.approx(float(gen.label_threshold))
    # the reported test scores are this checkpoint's, on this run's test patients, at the stored threshold
    test_x, test_y, _ = load_split(run / "soul.h5", ("test",))
    _, masks = label_images(gen, test_x)
    assert mask_scores(masks, test_y) == pytest.approx(report["test"])
    with pytest.raises(CheckpointError, match="image_size"):
        load_labeller(best, "cpu", 64)


def test_resume_after_a_kill_mid_schedule_ends_with_identical_weights(tmp_path):
    straight = _run_dir(tmp_path, "straight")
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "soul.h5", killed / "soul.h5")
    # adaptive: 10 steps, a validation (and checkpoint) every 3, so the kill falls mid-epoch
    config = TINY.with_overrides(**{"pix2pix.schedule": "adaptive", "pix2pix.epochs": 1, "pix2pix.min_steps": 10,
                                    "pix2pix.max_steps": 10, "pix2pix.val_every": 3, "pix2pix.patience": 3})
    done = train_pix2pix(straight, config, log=_quiet)
    first = train_pix2pix(killed, config, log=_quiet, max_validations_this_call=2)  # "killed" after step 6
    assert first.steps == 6 and first.epochs != int(first.epochs)
    torch.manual_seed(12345)  # a fresh process would have another RNG state: resume must restore it
    resumed = train_pix2pix(killed, config, log=_quiet)
    assert resumed.resumed_from_step == 6 and resumed.steps == done.steps == 10 and resumed.epochs > 1
    a, b = load_checkpoint(_ckpt(straight)), load_checkpoint(_ckpt(killed))
    for net in ("G", "D"):
        for k, v in a["modules"][net].items():
            assert torch.equal(v, b["modules"][net][k]), f"{net}.{k} differs after resume"
    for k, v in a["optimizers"]["G"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizers"]["G"]["state"][k]["exp_avg"])


# ---------------------------------------------------------------------------------- bad input


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse before that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_inputs_give_one_line_errors(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    with pytest.raises(BrvoError) as exc:
        train_pix2pix(run, TINY, log=_quiet)
    assert "soul.h5" in _one_line(exc) and "preprocess" in _one_line(exc)

    (run / "soul.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DatasetFormatError) as exc:
        preflight_train_pix2pix(run, TINY)
    assert "soul.h5" in _one_line(exc)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    write_blob_dataset(lonely / "soul.h5", n_patients=1, image_size=32)  # one patient: train only
    with pytest.raises(BrvoError) as exc:
        preflight_train_pix2pix(lonely, TINY)
    assert "held-out" in _one_line(exc) and "0/0" in _one_line(exc)

    with pytest.raises(BrvoError) as exc:
        preflight_train_pix2pix(lonely, TINY.with_overrides(image_size=64))
    assert "32 px" in _one_line(exc) and "64 px" in _one_line(exc)


def test_bad_checkpoints_are_refused_and_never_overwritten(tmp_path):
    run = _run_dir(tmp_path)
    train_pix2pix(run, TINY, log=_quiet, max_validations_this_call=1)
    last, best = _ckpt(run), _ckpt(run, "best.pt")
    before = {p: file_sha256(p) for p in (last, best)}

    def refused(config, match: str) -> None:
        with pytest.raises(CheckpointError) as exc:
            train_pix2pix(run, config, log=_quiet)
        assert match in _one_line(exc)
        assert {p: file_sha256(p) for p in (last, best)} == before

    refused(TINY.with_overrides(**{"pix2pix.ngf": 4}), "config_hash")  # another config
    refused(TINY.with_overrides(seed=1), "config_hash")  # another seed: resume would not be exact
    # another image size: same run dir, soul.h5 rewritten at 64 px
    shutil.move(run / "soul.h5", tmp_path / "soul32.h5")
    write_blob_dataset(run / "soul.h5", n_patients=8, image_size=64)
    refused(TINY.with_overrides(image_size=64), "image_size")
    shutil.move(tmp_path / "soul32.h5", run / "soul.h5")
    # an interrupted (truncated) last.pt: sha256 mismatch; best.pt stays as it was
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])
    before[last] = file_sha256(last)
    refused(TINY, "sha256")
    (last.parent / "last.pt.sha256").unlink()  # and without its sidecar: unverifiable, refused (issue 15)
    refused(TINY, "sidecar")
    (last.parent / "last.pt.sha256").write_text(file_sha256(last) + "\n")  # re-signed: torch cannot read it
    refused(TINY, "cannot load")
    last.write_bytes(good)
    (last.parent / "last.pt.sha256").write_text(file_sha256(last) + "\n")
    before[last] = file_sha256(last)
    # a pickled object in place of weights: weights_only refuses it, nothing is executed
    marker = tmp_path / "pwned"
    torch.save({"meta": {"model": "pix2pix"}, "evil": _Payload(str(marker))}, best)
    (best.parent / "best.pt.sha256").write_text(file_sha256(best) + "\n")  # signed, so torch.load is reached
    before[best] = file_sha256(best)
    refused(TINY, "cannot load checkpoint safely")
    with pytest.raises(CheckpointError):
        load_labeller(best, "cpu", 32)
    assert not marker.exists()


def test_evaluate_without_training_says_so(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        evaluate_pix2pix(run, TINY, log=_quiet)
    assert "train" in _one_line(exc)


def test_batches_made_ahead_in_a_thread_train_the_same_weights(tmp_path, monkeypatch):
    """fit's prefetch (on by default on CUDA): forced on CPU it changes no bit."""
    from functools import partial

    import tasks.pix2pix
    from brvo_models.training import fit

    plain = train_pix2pix(_run_dir(tmp_path, "plain"), TINY, log=_quiet)
    monkeypatch.setattr(tasks.pix2pix, "fit", partial(fit, prefetch=2))
    ahead = train_pix2pix(_run_dir(tmp_path, "ahead"), TINY, log=_quiet)
    a, b = load_checkpoint(Path(plain.checkpoint_dir) / "last.pt"), load_checkpoint(Path(ahead.checkpoint_dir) / "last.pt")
    for net in ("G", "D"):
        for k, v in a["modules"][net].items():
            assert torch.equal(v, b["modules"][net][k]), f"{net}.{k}"
    assert [r["G_L1"] for r in plain.history] == [r["G_L1"] for r in ahead.history]


def test_cuda_graphs_compile_the_training_modules_on_cuda_only(monkeypatch):
    """The flag's wiring (its speed and the CUDA run are the gpu-marked tests' job): reduce-overhead
    compiles of G and D on a CUDA device, the modules themselves elsewhere or when off."""
    from brvo_models.pix2pix import build_discriminator, training_callables

    compiled: list[tuple[nn.Module, str]] = []

    def fake_compile(module, mode=None, dynamic=None):
        compiled.append((module, mode))
        return ("compiled", module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = Pix2PixConfig(ngf=4, ndf=4, cuda_graphs=True)
    G, D = build_generator(config, 32), build_discriminator(config)
    assert training_callables(G, D, config, torch.device("cpu")) == (G, D)
    assert training_callables(G, D, config.model_copy(update={"cuda_graphs": False}), torch.device("cuda")) == (G, D)
    assert compiled == []
    assert training_callables(G, D, config, torch.device("cuda:0")) == (("compiled", G), ("compiled", D))
    assert compiled == [(G, "reduce-overhead"), (D, "reduce-overhead")]


def test_cuda_graphs_are_not_part_of_the_checkpoint_identity():
    from brvo_models.identity import CheckpointIdentity

    a = CheckpointIdentity("pix2pix", Pix2PixConfig(), 64, 0)
    b = CheckpointIdentity("pix2pix", Pix2PixConfig(cuda_graphs=True), 64, 0)
    assert a.config_hash == b.config_hash  # a run may resume with the flag changed
    assert a.config_hash != CheckpointIdentity("pix2pix", Pix2PixConfig(ngf=32), 64, 0).config_hash


def test_the_checkpoint_cadence_is_not_part_of_either_models_checkpoint_identity():
    """A run killed under one checkpoint_every_s may resume under another: it changes when weights are written,
    not what is trained."""
    from brvo_models.configs import CRGANConfig
    from brvo_models.identity import CheckpointIdentity

    for name, cls in (("pix2pix", Pix2PixConfig), ("crgan", CRGANConfig)):
        a = CheckpointIdentity(name, cls(), 64, 0)
        assert a.config_hash == CheckpointIdentity(name, cls(checkpoint_every_s=60), 64, 0).config_hash
        assert a.config_hash != CheckpointIdentity(name, cls(epochs=3), 64, 0).config_hash
