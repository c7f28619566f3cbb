"""The training schedule and loop (brvo_models.training): step budgets, validation points, early
stopping, the lr clock, checkpoints and exact resume, on a small fake model that runs in milliseconds."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from brvo_models.configs import CRGANConfig, Pix2PixConfig
from brvo_models.identity import CheckpointIdentity
from brvo_models.training import BEST, LAST, LossSums, Schedule, fit, steps_per_epoch
from storage.checkpoints import load_checkpoint
from storage.errors import BrvoError, CheckpointError
from tasks.config import preset


def _adaptive(**kw) -> Pix2PixConfig:
    return Pix2PixConfig(**{"schedule": "adaptive", "epochs": 4, "min_steps": 40, "max_steps": 300,
                            "val_every": 10, **kw})


class FakeModel:
    """A one-weight Trainable. ``scores``: what validate returns, in order (None: a score computed
    from the weights, so a resumed run validates like an uninterrupted one). Each step draws from
    the global torch RNG, as dropout does, so a resume must restore it."""

    name = "fake"

    def __init__(self, scores=None, lr: float = 0.1, tensor_losses: bool = False) -> None:
        self.tensor_losses = tensor_losses  # return the loss as a tensor, as the GANs do (no .item())
        self.net = torch.nn.Linear(1, 1)
        with torch.no_grad():  # the same start for every instance, whatever the RNG state
            self.net.weight.fill_(0.3)
            self.net.bias.fill_(-0.2)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.scores = list(scores) if scores is not None else None
        self.validations = 0
        self.lrs: list[float] = []

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def train_step(self, batch):
        self.lrs.append(self.opt.param_groups[0]["lr"])
        x = batch + 0.01 * torch.randn(batch.shape)
        loss = ((self.net(x) - 2 * x) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach() if self.tensor_losses else loss.item()}

    def validate(self):
        self.validations += 1
        if self.scores is None:
            x = torch.linspace(-1, 1, 5)[:, None]
            return {"score": -float(((self.net(x) - 2 * x) ** 2).mean())}
        return {"score": self.scores[min(self.validations - 1, len(self.scores) - 1)]}


def batches_of(spe: int):
    """``spe`` batches per epoch, a pure function of the epoch (as the real ones are)."""
    def batches(epoch: int):
        g = torch.Generator().manual_seed(1000 + epoch)
        for _ in range(spe):
            yield torch.randn(4, 1, generator=g)
    return batches


def _fit(model, config, spe, tmp_path, **kw):
    torch.manual_seed(0)
    return fit(model, batches_of(spe), schedule=Schedule.from_config(config, spe), checkpoint_dir=tmp_path,
               identity=CheckpointIdentity("fake", config, 32, 0), log=lambda _m: None, **kw)


# ---------------------------------------------------------------------------------- the budget


def test_a_tiny_dataset_gets_at_least_min_steps(tmp_path):
    config = _adaptive()
    assert Schedule.from_config(config, steps_per_epoch=3).total_steps == 40  # 4 epochs x 3 = 12 < 40
    model = FakeModel()
    result = _fit(model, config, 3, tmp_path)
    assert len(model.lrs) == result.steps == 40 and not result.stopped_early
    assert [r["step"] for r in result.history] == [10, 20, 30, 40]
    assert result.epochs == pytest.approx(40 / 3)


def test_a_larger_dataset_gets_proportionally_more_steps_up_to_max_steps():
    config = _adaptive()
    budgets = {spe: Schedule.from_config(config, spe).total_steps for spe in (3, 10, 20, 50, 75, 100)}
    assert budgets == {3: 40, 10: 40, 20: 80, 50: 200, 75: 300, 100: 300}
    assert steps_per_epoch(594, 8) == 75 and steps_per_epoch(37, 8) == 5 and steps_per_epoch(37, 8, repeats=2) == 10
    # the demo preset on the 53-patient phantom keeps today's compute; on 134 images it gets min_steps, not 272
    demo = preset("demo")
    assert Schedule.from_config(demo.pix2pix, steps_per_epoch(594, 8)).total_steps == 1200
    assert Schedule.from_config(demo.pix2pix, steps_per_epoch(134, 8)).total_steps == 1200 > 16 * 17
    assert Schedule.from_config(demo.crgan, steps_per_epoch(37, 8)).total_steps == 500


def test_the_fixed_schedule_runs_exactly_its_epochs_and_never_stops_early(tmp_path):
    config = Pix2PixConfig(schedule="fixed", epochs=3, patience=1, min_steps=1, val_every=1)
    model = FakeModel(scores=[0.9, 0.1, 0.1])  # would stop an adaptive run after the second validation
    result = _fit(model, config, 4, tmp_path)
    assert result.steps == len(model.lrs) == 12 and not result.stopped_early
    assert [r["step"] for r in result.history] == [4, 8, 12]  # one validation per epoch
    assert result.best_step == 4 and load_checkpoint(tmp_path / BEST)["meta"]["step"] == 4


# ------------------------------------------------------------------------------ early stopping


def test_early_stopping_stops_when_the_validation_score_stops_improving(tmp_path):
    config = _adaptive(min_steps=20, max_steps=200, val_every=5, patience=2)
    model = FakeModel(scores=[0.1, 0.2, 0.3, 0.3, 0.25, 0.9, 0.9])
    result = _fit(model, config, 7, tmp_path)
    # best at step 15 (0.3); 0.3 again and 0.25 are two validations without improvement -> stop at 25
    assert result.stopped_early and result.steps == len(model.lrs) == 25 and model.validations == 5
    assert result.best_step == 15 and result.best_metrics["val_score"] == 0.3
    assert load_checkpoint(tmp_path / BEST)["meta"]["step"] == 15
    # a re-run finds the finished checkpoint and trains nothing more
    again = FakeModel()
    rerun = _fit(again, config, 7, tmp_path)
    assert again.lrs == [] and rerun.steps == 25 and rerun.stopped_early


def test_early_stopping_waits_for_min_steps(tmp_path):
    config = _adaptive(min_steps=20, max_steps=200, val_every=5, patience=1)
    model = FakeModel(scores=[0.5, 0.4, 0.4, 0.4, 0.4])  # no improvement after the first validation
    result = _fit(model, config, 7, tmp_path)
    assert result.stopped_early and result.steps == 20 and result.best_step == 5


def test_min_improvement_counts_small_gains_as_none(tmp_path):
    config = _adaptive(min_steps=5, max_steps=200, val_every=5, patience=2, min_improvement=0.05)
    model = FakeModel(scores=[0.50, 0.52, 0.54, 0.56])  # each a new best, none by more than 0.05 over 0.50
    result = _fit(model, config, 7, tmp_path)
    assert result.steps == 15 and result.best_step == 15  # best.pt still follows the best score


# -------------------------------------------------------------------------------------- the lr


def test_the_lr_follows_the_schedule(tmp_path):
    # adaptive: 10 steps, the last half decaying per step with the reference rule
    config = _adaptive(min_steps=10, max_steps=10, val_every=10, decay_fraction=0.5)
    model = FakeModel(lr=0.1)
    _fit(model, config, 3, tmp_path / "adaptive")
    expected = [1.0] * 5 + [1 - k / 6 for k in range(1, 6)]
    assert model.lrs == pytest.approx([0.1 * f for f in expected])
    # fixed: 4 epochs of 3 steps, half decaying per epoch (the reference pix2pix: 1, 1, 2/3, 1/3)
    model = FakeModel(lr=0.1)
    _fit(model, Pix2PixConfig(schedule="fixed", epochs=4, decay_fraction=0.5), 3, tmp_path / "fixed")
    assert model.lrs == pytest.approx([0.1 * f for f in [1, 1, 1, 1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3]])
    # the full preset keeps the reference: 100 epochs constant, then 100 of linear decay
    full = Schedule.from_config(preset("full").pix2pix, steps_per_epoch=5)
    assert full.total_steps == 1000 and full.lr_factor(499) == 1.0
    assert full.lr_factor(500) == pytest.approx(1 - 1 / 101) and full.lr_factor(999) == pytest.approx(1 / 101)


# ------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_resume_after_a_kill_mid_schedule_gives_the_weights_of_an_uninterrupted_run(tmp_path, kill_after):
    # 7 steps per epoch, validations every 4 steps: the kills fall mid-epoch; patience state crosses the kill
    config = _adaptive(min_steps=30, max_steps=30, val_every=4, patience=3)
    straight = FakeModel()
    full = _fit(straight, config, 7, tmp_path / "straight")
    first = _fit(FakeModel(), config, 7, tmp_path / "killed", max_validations_this_call=kill_after)
    assert first.steps == 4 * kill_after
    torch.manual_seed(12345)  # a fresh process would have another RNG state: resume must restore it
    resumed_model = FakeModel()
    resumed = fit(resumed_model, batches_of(7), schedule=Schedule.from_config(config, 7),
                  checkpoint_dir=tmp_path / "killed", identity=CheckpointIdentity("fake", config, 32, 0),
                  log=lambda _m: None)
    assert resumed.resumed_from_step == 4 * kill_after and resumed.steps == full.steps
    assert len(resumed_model.lrs) == full.steps - 4 * kill_after
    assert torch.equal(straight.net.weight, resumed_model.net.weight)
    assert torch.equal(straight.net.bias, resumed_model.net.bias)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]
    assert resumed.best_step == full.best_step


class FakeClock:
    """Seconds that advance by ``per_call`` each time they are read (one read per validation, one per write)."""

    def __init__(self, per_call: float) -> None:
        self.now, self.per_call = 0.0, per_call

    def __call__(self) -> float:
        self.now += self.per_call
        return self.now


def _weights(path):
    return {k: v for k, v in load_checkpoint(path)["modules"]["net"].items()}


def test_a_checkpoint_cadence_writes_less_and_ends_with_the_same_checkpoints(tmp_path, monkeypatch):
    """checkpoint_every_s (the full preset's 60 s): fewer writes of the 0.5-0.7 GB checkpoints, and the run
    ends with the best.pt and last.pt that writing at every validation gives."""
    import brvo_models.training as training

    config = _adaptive(min_steps=40, max_steps=40, val_every=4)  # 10 validations
    every = _fit(FakeModel(), config, 7, tmp_path / "every")
    writes = []
    real_save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda path, payload: writes.append(path.name) or
                        real_save(path, payload))
    sparse = _fit(FakeModel(), config, 7, tmp_path / "sparse", checkpoint_every_s=10.0, clock=FakeClock(1.0))
    assert writes.count(LAST) < 10 and writes[-1] == LAST  # not every validation; always at the end
    assert load_checkpoint(tmp_path / "sparse" / LAST)["meta"]["step"] == 40
    assert sparse.best_step == every.best_step
    for name in (BEST, LAST):
        a, b = _weights(tmp_path / "every" / name), _weights(tmp_path / "sparse" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(tmp_path / "sparse" / LAST)["progress"]["best_sha256"] == sparse.best_sha256


def test_a_kill_between_checkpoint_writes_resumes_from_the_older_one_and_ends_the_same(tmp_path):
    """A crash after validations that wrote nothing: the resume starts at the last written step, replays the
    lost steps and ends with the weights and best step of an uninterrupted run."""
    config = _adaptive(min_steps=40, max_steps=40, val_every=4, patience=0)
    straight = FakeModel()
    full = _fit(straight, config, 7, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_at_step_28(row):
        if row["step"] == 28:
            raise Killed

    with pytest.raises(Killed):  # the clock is read once per validation: writes after 3 more seconds pass
        _fit(FakeModel(), config, 7, tmp_path / "killed", checkpoint_every_s=3.0, clock=FakeClock(1.0),
             on_validation=kill_at_step_28)
    written_at = load_checkpoint(tmp_path / "killed" / LAST)["meta"]["step"]
    assert 0 < written_at < 28
    torch.manual_seed(12345)
    resumed_model = FakeModel()
    resumed = fit(resumed_model, batches_of(7), schedule=Schedule.from_config(config, 7),
                  checkpoint_dir=tmp_path / "killed", identity=CheckpointIdentity("fake", config, 32, 0),
                  log=lambda _m: None, checkpoint_every_s=3.0, clock=FakeClock(1.0))
    assert resumed.resumed_from_step == written_at and resumed.steps == full.steps
    assert torch.equal(straight.net.weight, resumed_model.net.weight)
    assert resumed.best_step == full.best_step
    a, b = _weights(tmp_path / "killed" / BEST), _weights(tmp_path / "straight" / BEST)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_on_another_schedule_is_refused_untouched(tmp_path):
    config = _adaptive(min_steps=30, max_steps=30, val_every=4)
    _fit(FakeModel(), config, 7, tmp_path, max_validations_this_call=1)
    before = (tmp_path / LAST).read_bytes()
    with pytest.raises(CheckpointError, match="config_hash"):  # another config: refused by its hash
        _fit(FakeModel(), _adaptive(min_steps=30, max_steps=30, val_every=4, epochs=5), 7, tmp_path)
    with pytest.raises(CheckpointError, match="schedule") as exc:  # the data changed: 9 steps per epoch now
        _fit(FakeModel(), config, 9, tmp_path)
    assert "\n" not in str(exc.value)
    assert (tmp_path / LAST).read_bytes() == before


def test_batches_must_match_the_schedule(tmp_path):
    config = _adaptive(min_steps=30, max_steps=30, val_every=4)
    with pytest.raises(RuntimeError, match="yielded 5 batches"):
        fit(FakeModel(), batches_of(5), schedule=Schedule.from_config(config, 7), checkpoint_dir=tmp_path,
            identity=CheckpointIdentity("fake", config, 32, 0), log=lambda _m: None)


def test_one_log_line_per_validation(tmp_path):
    lines: list[str] = []
    config = _adaptive(min_steps=20, max_steps=20, val_every=10)
    fit(FakeModel(), batches_of(3), schedule=Schedule.from_config(config, 3), checkpoint_dir=tmp_path,
        identity=CheckpointIdentity("fake", config, 32, 0), log=lines.append)
    steps = [line for line in lines if " step " in line]
    assert len(steps) == 2
    for key in ("step 10/20", "loss=", "val_score=", "best=", "lr_factor="):
        assert key in steps[0]


# ------------------------------------------------------------------------ no host sync per step


def test_loss_sums_stay_on_the_device_and_equal_the_float_sums_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    values = [torch.rand((), generator=g) * 10 ** float(e) for e in torch.randint(-4, 4, (200,), generator=g)]
    expected = 0.0
    for v in values:
        expected += float(v)

    def no_sync(*_a, **_k):
        raise AssertionError("LossSums.add copied a loss to the host")

    sums = LossSums()
    with monkeypatch.context() as m:  # add must never read a value back (on CUDA: a wait for the GPU)
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "__float__", no_sync)
        m.setattr(torch.Tensor, "tolist", no_sync)
        for v in values:
            sums.add({"loss": v, "plain": 0.5})
    host = sums.to_host()
    assert host["loss"] == expected  # the same bits as the float loop fit kept before
    assert host["plain"] == 100.0 and list(host) == ["loss", "plain"]


def test_tensor_losses_give_the_history_and_weights_of_float_losses(tmp_path):
    config = _adaptive(min_steps=20, max_steps=20, val_every=7)
    floats, tensors = FakeModel(), FakeModel(tensor_losses=True)
    a = _fit(floats, config, 3, tmp_path / "floats")
    b = _fit(tensors, config, 3, tmp_path / "tensors")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    assert strip(a.history) == strip(b.history) and len(a.history) == 3
    assert torch.equal(floats.net.weight, tensors.net.weight)


# ---------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("model,field,value", [
    ("pix2pix", "batch_size", 0), ("pix2pix", "epochs", 0), ("pix2pix", "lr", 0.0), ("pix2pix", "ngf", 0),
    ("pix2pix", "threshold", 1.5), ("pix2pix", "decay_fraction", 1.2), ("pix2pix", "val_every", 0),
    ("pix2pix", "patience", -1), ("pix2pix", "schedule", "forever"), ("crgan", "hide_prob", -0.1),
    ("crgan", "unknown_patient_prob", 2.0), ("crgan", "lr_g", -1e-4), ("crgan", "hidden_dim", 0),
    ("crgan", "repeats", 0), ("crgan", "beta1", 1.0), ("crgan", "min_steps", 0),
])
def test_a_bad_model_config_value_is_refused_naming_the_field(model, field, value):
    with pytest.raises(BrvoError, match=f"{model}.{field}") as exc:
        preset("demo").with_overrides(**{f"{model}.{field}": value})
    assert "\n" not in str(exc.value)


def test_min_steps_above_max_steps_is_refused():
    with pytest.raises(ValidationError, match="min_steps"):
        CRGANConfig(min_steps=600, max_steps=500)
    with pytest.raises(BrvoError, match="min_steps"):
        preset("demo").with_overrides(**{"pix2pix.min_steps": 5000})


# ------------------------------------------------------------------------------------ prefetch


def _prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "fit-prefetch" and t.is_alive()]


@pytest.mark.parametrize("kill_after", [None, 2])
def test_prefetching_batches_changes_no_result(tmp_path, kill_after):
    """The GPU path makes batches in a background thread; on CPU, forced, it must give the same bits."""
    config = _adaptive(min_steps=30, max_steps=30, val_every=4, patience=3)
    plain, ahead = FakeModel(), FakeModel(tensor_losses=True)
    a = _fit(plain, config, 7, tmp_path / "plain")
    if kill_after:  # a resume mid-epoch: the thread skips the batches already trained on
        _fit(FakeModel(tensor_losses=True), config, 7, tmp_path / "ahead", prefetch=2,
             max_validations_this_call=kill_after)
        torch.manual_seed(12345)
        b = fit(ahead, batches_of(7), schedule=Schedule.from_config(config, 7), checkpoint_dir=tmp_path / "ahead",
                identity=CheckpointIdentity("fake", config, 32, 0), log=lambda _m: None, prefetch=3)
    else:
        b = _fit(ahead, config, 7, tmp_path / "ahead", prefetch=2)
    assert torch.equal(plain.net.weight, ahead.net.weight) and torch.equal(plain.net.bias, ahead.net.bias)
    assert [r["step"] for r in a.history] == [r["step"] for r in b.history]
    assert a.history[-1]["loss"] == b.history[-1]["loss"]
    assert not _prefetch_threads()  # the thread is gone once fit returns


def test_prefetch_stages_batches_and_raises_their_errors_in_fit(tmp_path):
    config = _adaptive(min_steps=10, max_steps=10, val_every=5)
    staged: list[int] = []

    class Staging(FakeModel):
        def stage(self, batch):
            staged.append(len(staged))
            return batch * 1.0

    _fit(Staging(), config, 3, tmp_path / "ok", prefetch=2)
    assert len(staged) >= 10  # every trained batch went through stage (the thread may run ahead)

    def broken(epoch: int):
        yield torch.zeros(4, 1)
        raise OSError("soul.h5 went away")

    with pytest.raises(OSError, match="went away"):
        fit(FakeModel(), broken, schedule=Schedule.from_config(config, 3), checkpoint_dir=tmp_path / "bad",
            identity=CheckpointIdentity("fake", config, 32, 0), log=lambda _m: None, prefetch=2)
    assert not _prefetch_threads()
