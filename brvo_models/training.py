"""The training contract the two GANs follow, and the step loop that drives it.

Pix2Pix and CRGAN implement :class:`Trainable` (the small segmenters of the usefulness
experiment train for a fixed number of steps in a loop of their own, with no checkpoints):
named modules and optimisers, a ``train_step`` on one batch and a ``validate`` that returns
metrics with a ``score`` (higher is better). :func:`fit` owns everything around that.

* **A schedule counted in optimiser steps** (:class:`Schedule`). 'fixed' runs exactly
  ``epochs`` epochs and validates at each epoch's end, as the reference pix2pix does.
  'adaptive' scales a step budget to the dataset (``epochs`` epochs' worth of steps, clamped
  to ``[min_steps, max_steps]``), so a small dataset is not silently given a fraction of the
  training; it validates every ``val_every`` steps and stops early once the validation score
  has not improved for ``patience`` validations, never before ``min_steps``.
* **The learning rate is a function of the step counter**: constant, then a linear decay
  towards 0 over the final ``decay_fraction`` of the schedule (per epoch when 'fixed', the
  reference rule; per step when 'adaptive'). fit sets it before every optimiser step.
* **Checkpoints at every validation**: ``last.pt`` (weights, optimiser states, torch RNG,
  step, schedule, early-stopping state, metrics history, the model's self-description from
  :mod:`brvo_models.identity`) and ``best.pt`` on the best validation score; atomic, sha256
  beside each (storage.checkpoints).
* **No host synchronisation per step.** ``train_step`` returns its losses as (detached)
  tensors; fit adds them up where they are, in float64, and copies the sums to the host once
  per validation (:class:`LossSums`). On CUDA a step then never waits for the GPU, so the
  host queues the next step's kernels while the GPU runs this one. (Python floats are accepted
  too.) The float64 sums equal, bit for bit, the Python float sums fit kept before.
* **A diverged run stops in one line.** A NaN or infinite loss (a learning rate far too high)
  would otherwise train on to the end and leave a checkpoint of garbage that validates as
  "best". LossSums also remembers, on the device, the first step whose loss was not finite;
  the validation that brings the sums to the host raises :class:`TrainingDivergedError`
  naming that step, before anything of it is written. So does a non-finite validation score.
* **Batches made ahead of the GPU** (``prefetch``, on by default on CUDA only): a background
  thread calls ``batches(epoch)`` and the model's optional ``stage(batch)`` (the batch as
  tensors on the device: pinned copies, noise drawn there) a few batches ahead, across epoch
  boundaries, so the host builds batch n+1 while the GPU trains on batch n. Batches are pure
  functions of the epoch and ``stage`` draws from no global RNG, so prefetching changes no
  result (tested on CPU against the sequential loop, bit for bit).
* **Precision from the model's config.** A model whose ``config`` has a ``precision`` ('auto', 'fp32',
  'bf16'; brvo_models.runtime) trains and validates under it: fit sets it around the loop, and every
  ``autocast(device)`` inside follows it.
* **Exact resume.** ``batches(epoch)`` is a pure function of the epoch (seeded), so a resume
  at step s replays epoch s // steps_per_epoch and skips the batches already trained on; with
  the RNG, optimiser and early-stopping state restored, a run killed mid-schedule and resumed
  ends, on CPU, with the weights of an uninterrupted run.
"""
from __future__ import annotations

import copy
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from brvo_models.identity import CheckpointIdentity
from brvo_models.runtime import precision_scope
from storage.checkpoints import load_checkpoint, save_checkpoint, state_must_fit
from storage.errors import BrvoError, CheckpointError

LAST = "last.pt"
BEST = "best.pt"


class TrainingDivergedError(BrvoError):
    """A loss or validation score became NaN or infinite: the weights are garbage from that step on."""


class Trainable(Protocol):
    name: str

    def modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(self, batch: Any) -> dict[str, torch.Tensor | float]: ...

    def validate(self) -> dict[str, float]: ...

    # optional: ``stage(batch)`` -> the batch ready for ``train_step`` on the model's device; fit's
    # prefetch thread calls it ahead of training. train_step must accept raw and staged batches.


@dataclass(frozen=True)
class Schedule:
    """How long a model trains and when it validates, in optimiser steps; build with :meth:`from_config`."""

    kind: str
    steps_per_epoch: int
    total_steps: int  # the budget: the run ends here unless it stops early
    val_every: int  # steps between validations (and checkpoints); the last step always validates
    min_steps: int  # no early stop before this many steps
    patience: int  # validations without improvement before stopping; 0 = never stop early
    min_improvement: float  # a score must beat the best by more than this to reset the patience
    lr_unit: int  # steps per lr change: an epoch ('fixed', the reference rule) or one step
    decay_units: int  # final lr units with linear decay

    @classmethod
    def from_config(cls, config: Any, steps_per_epoch: int) -> "Schedule":
        """The schedule a model config asks for (its ``schedule``, ``epochs``, ``decay_fraction``,
        ``min_steps``, ``max_steps``, ``val_every``, ``patience``, ``min_improvement``) on a dataset
        of ``steps_per_epoch`` batches per epoch."""
        spe = int(steps_per_epoch)
        if spe < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {spe}")
        if config.schedule == "fixed":
            total = int(config.epochs) * spe
            return cls("fixed", spe, total, val_every=spe, min_steps=total, patience=0, min_improvement=0.0,
                       lr_unit=spe, decay_units=int(round(config.epochs * config.decay_fraction)))
        total = min(max(int(config.epochs) * spe, int(config.min_steps)), int(config.max_steps))
        return cls("adaptive", spe, total, val_every=int(config.val_every), min_steps=min(int(config.min_steps), total),
                   patience=int(config.patience), min_improvement=float(config.min_improvement), lr_unit=1,
                   decay_units=int(round(total * config.decay_fraction)))

    def lr_factor(self, step: int) -> float:
        """The lr multiplier of the optimiser step taken after ``step`` steps.

        The reference pix2pix rule on this schedule's unit: 1 for the first (units - decay)
        units, then 1 - k / (decay + 1) in the k-th decaying unit, so the last unit trains at
        1 / (decay + 1) of the base lr, not at 0.
        """
        units = self.total_steps // self.lr_unit
        n_const = units - self.decay_units
        return 1.0 - max(0, step // self.lr_unit + 1 - n_const) / float(self.decay_units + 1)

    def validates_after(self, step: int) -> bool:
        return step % self.val_every == 0 or step == self.total_steps

    def describe(self) -> str:
        text = (f"{self.kind} schedule: {self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.1f} epochs "
                f"of {self.steps_per_epoch} steps), validation every {self.val_every} steps")
        if self.patience > 0:
            text += (f", early stop after {self.patience} validations without improvement "
                     f"(not before step {self.min_steps})")
        return text


def steps_per_epoch(n_items: int, batch_size: int, repeats: int = 1) -> int:
    """Batches in an epoch of ``n_items`` seen ``repeats`` times, the last batch partial."""
    return max(1, math.ceil(int(n_items) * int(repeats) / int(batch_size)))


@dataclass
class FitResult:
    last_path: Path
    best_path: Path
    best_sha256: str
    best_step: int
    best_metrics: dict[str, float]
    schedule: Schedule
    steps: int  # optimiser steps trained in total (this call and the ones it resumed)
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    seconds: float = 0.0

    @property
    def best_epoch(self) -> float:
        return self.best_step / self.schedule.steps_per_epoch

    @property
    def epochs(self) -> float:
        return self.steps / self.schedule.steps_per_epoch


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights, so a resume continues where the run was."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = float("-inf")
    best_step: int = -1
    best_sha256: str = ""
    patience_score: float = float("-inf")  # the score the patience counts from (best + min_improvement rule)
    bad_validations: int = 0
    finished: bool = False
    stopped_early: bool = False


def fit(
    model: Trainable,
    batches: Callable[[int], Iterable[Any]],
    *,
    schedule: Schedule,
    checkpoint_dir: Path,
    identity: CheckpointIdentity,
    on_validation: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    max_validations_this_call: int | None = None,
    prefetch: int | None = None,
    checkpoint_every_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> FitResult:
    """Train ``model`` on ``schedule``, resuming from ``checkpoint_dir/last.pt`` when present.

    ``batches(epoch)`` yields exactly ``schedule.steps_per_epoch`` batches, the same ones every
    time it is called with that epoch (seed its shuffling and augmentation with the epoch).
    ``identity`` (:class:`brvo_models.identity.CheckpointIdentity`) describes every checkpoint
    written and is checked on resume, so a checkpoint from another model, config, seed or image
    size is refused before anything is overwritten; so is one written on another schedule (the
    data changed the steps per epoch). ``on_validation(row)`` gets each history row (``step``,
    ``total_steps``, ``epoch``, mean losses since the last validation, ``val_*``, ``lr_factor``,
    ``seconds`` since the last row, ``seconds_validating`` of them). ``max_validations_this_call``
    returns after that many validations, the last of which wrote last.pt (tests use it to simulate a kill).
    ``prefetch``: batches made (and staged) ahead in a background thread; None: 2 on CUDA, 0 (none,
    the plain loop) elsewhere.

    ``checkpoint_every_s``: 0 writes last.pt (and best.pt when the score improved) at every validation.
    A positive value writes them only once that many seconds (``clock``) have passed since the last
    write, and always when training ends: at 256 px a checkpoint with its optimiser state is 0.5-0.7 GB
    and takes 1.0-3.4 s to write, longer than CRGAN's three training steps between validations. In
    between, the newest best state waits in host memory. A kill loses at most that much training,
    and the resume from the older last.pt replays it exactly (same weights, same best step).
    """
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    progress = _Progress()
    if last_path.exists():
        state = load_checkpoint(last_path, expect=identity.meta)
        if state.get("schedule") != asdict(schedule):
            raise CheckpointError(
                f"{last_path}: checkpoint was trained on another schedule ({_schedule_text(state.get('schedule'))}) "
                f"than this run's data gives ({_schedule_text(asdict(schedule))}); use a fresh run directory or "
                f"delete {checkpoint_dir}")
        with state_must_fit(last_path):  # weights of another shape: a one-line CheckpointError
            _restore(model, state)
        progress = _Progress(**state["progress"], history=list(state["history"]))
        log(f"{model.name}: resuming from {last_path} at step {progress.step}/{schedule.total_steps}"
            + (" (finished)" if progress.finished else ""))
    resumed_from = progress.step
    base_lrs = _base_lrs(model)
    log(f"{model.name}: {schedule.describe()}")
    t_start = time.perf_counter()
    epoch, skip = divmod(progress.step, schedule.steps_per_epoch)
    if prefetch is None:
        prefetch = 2 if torch.device(getattr(model, "device", "cpu")).type == "cuda" else 0
    source = _Prefetcher(batches, getattr(model, "stage", None), epoch, skip, prefetch) if prefetch > 0 else None
    try:
        writer = _CheckpointWriter(last_path, best_path, checkpoint_every_s, clock)
        with precision_scope(getattr(getattr(model, "config", None), "precision", None)):
            _train(model, batches if source is None else source.epoch, schedule, identity, progress, epoch, skip,
                   base_lrs, writer, on_validation, log, max_validations_this_call)
    finally:
        if source is not None:
            source.close()
    if not best_path.exists():
        raise RuntimeError(f"{model.name}: no step was validated and no best checkpoint exists")
    best_row = next((r for r in progress.history if r["step"] == progress.best_step),
                    progress.history[-1] if progress.history else {})
    return FitResult(last_path=last_path, best_path=best_path, best_sha256=progress.best_sha256,
                     best_step=progress.best_step, best_metrics=best_row, schedule=schedule, steps=progress.step,
                     stopped_early=progress.stopped_early, history=progress.history,
                     resumed_from_step=resumed_from, seconds=time.perf_counter() - t_start)


def _train(model: Trainable, batches: Callable[[int], Iterable[Any]], schedule: Schedule,
           identity: CheckpointIdentity, progress: _Progress, epoch: int, skip: int, base_lrs,
           writer: "_CheckpointWriter", on_validation, log, max_validations_this_call: int | None) -> None:
    """fit's step loop, from ``epoch`` (its first ``skip`` batches already trained on) to the end or a stop."""
    validations = 0
    sums = LossSums()
    n_since = 0
    t_since = time.perf_counter()
    _set_mode(model, train=True)
    while not progress.finished:
        n_batches = 0
        for batch in batches(epoch):
            n_batches += 1
            if n_batches > schedule.steps_per_epoch:
                raise RuntimeError(f"{model.name}: batches({epoch}) yields more than the schedule's "
                                   f"{schedule.steps_per_epoch} steps per epoch")
            if n_batches <= skip:  # trained on before the resume: replayed, not trained again
                continue
            factor = schedule.lr_factor(progress.step)
            _set_lr(model, base_lrs, factor)
            sums.add(model.train_step(batch), step=progress.step + 1)
            n_since += 1
            progress.step += 1
            if not schedule.validates_after(progress.step):
                continue
            row, improved = _validate(model, schedule, progress, sums, n_since, factor, t_since, base_lrs)
            validations += 1
            returning = progress.finished or (max_validations_this_call is not None
                                              and validations >= max_validations_this_call)
            writer.after_validation(_payload(model, schedule, identity, progress), progress, improved,
                                    force=returning)
            log(_log_line(model.name, schedule, progress, row))
            if on_validation is not None:
                on_validation(row)
            sums, n_since, t_since = LossSums(), 0, time.perf_counter()
            if returning:
                break
        else:
            if n_batches != schedule.steps_per_epoch:
                raise RuntimeError(f"{model.name}: batches({epoch}) yielded {n_batches} batches, the schedule "
                                   f"expects {schedule.steps_per_epoch} per epoch")
            epoch, skip = epoch + 1, 0
            continue
        break


_END = object()  # marks the end of an epoch in the prefetch queue


class _Prefetcher:
    """Makes batches ahead of training in one background thread, in order, across epoch boundaries.

    ``epoch(e)`` yields epoch e's batches as ``batches(e)`` yields them, each passed through
    ``stage`` (None for the first ``skip`` batches of the first epoch, which a resume skips);
    epochs must be asked for in order, as fit does. An error in the thread is raised where the
    batch would have been. :meth:`close` stops the thread (it may have run ahead of a stop).
    """

    def __init__(self, batches: Callable[[int], Iterable[Any]], stage: Callable[[Any], Any] | None,
                 first_epoch: int, skip: int, depth: int) -> None:
        self._batches, self._stage = batches, stage or (lambda batch: batch)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(first_epoch, skip), name="fit-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, epoch: int, skip: int) -> None:
        try:
            while not self._stop.is_set():
                for i, batch in enumerate(self._batches(epoch)):
                    if not self._put((epoch, None if i < skip else self._stage(batch))):
                        return
                if not self._put((epoch, _END)):
                    return
                epoch, skip = epoch + 1, 0
        except BaseException as exc:  # handed to the training loop, raised there
            self._put((epoch, exc))

    def epoch(self, epoch: int):
        while True:
            got, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if got != epoch:
                raise RuntimeError(f"prefetch: epoch {epoch} asked for, epoch {got} made (epochs out of order)")
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


class LossSums:
    """Running sums of the losses ``train_step`` returns, kept on their device until :meth:`to_host`.

    A tensor loss is added as float64 where it lives (no ``.item()``, so no wait for the GPU);
    a float is added as a Python float. Either way the sum is the float64 sum of the values in
    step order, the same bits a loop of ``total + float(loss)`` gives. Given the ``step``, it also
    keeps the first step whose losses were not all finite (on the device as well).
    """

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor | float] = {}
        self._first_bad: torch.Tensor | None = None  # first non-finite step of tensor losses, -1: none yet
        self._first_bad_float: int | None = None  # the same for float losses

    def add(self, losses: dict[str, torch.Tensor | float], step: int | None = None) -> None:
        bad: torch.Tensor | None = None
        for k, v in losses.items():
            value = v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else float(v)
            total = self.totals.get(k)
            self.totals[k] = value if total is None else total + value
            if step is None:
                continue
            if isinstance(value, torch.Tensor):
                not_finite = ~torch.isfinite(value).all()
                bad = not_finite if bad is None else bad | not_finite.to(bad.device)
            elif not math.isfinite(value) and self._first_bad_float is None:
                self._first_bad_float = int(step)
        if bad is not None:
            first = self._first_bad if self._first_bad is not None else torch.full((), -1, device=bad.device)
            self._first_bad = first.masked_fill(bad & (first < 0), int(step))

    def first_non_finite_step(self) -> int | None:
        """The first step given to :meth:`add` with a NaN or infinite loss (None: none); reads the device."""
        steps = [s for s in (self._first_bad_float,
                             None if self._first_bad is None else int(self._first_bad)) if s is not None and s >= 0]
        return min(steps) if steps else None

    def to_host(self) -> dict[str, float]:
        """The sums as Python floats: one device-to-host copy for all tensor sums on a device."""
        tensors = {k: v for k, v in self.totals.items() if isinstance(v, torch.Tensor)}
        out = {k: float(v) for k, v in self.totals.items() if not isinstance(v, torch.Tensor)}
        if tensors:
            values = torch.stack([v.reshape(()) for v in tensors.values()]).cpu().tolist()
            out.update(zip(tensors, values))
        return {k: out[k] for k in self.totals}


def _validate(model, schedule: Schedule, progress: _Progress, sums: LossSums, n_since, factor,
              t_since: float, base_lrs: dict[str, list[float]]) -> tuple[dict[str, float], bool]:
    """Validate, update the best score and the early-stopping state; return (history row, new best?).

    A non-finite loss since the last validation, or a non-finite score, raises TrainingDivergedError."""
    losses = sums.to_host()  # the one host synchronisation for the steps since the last row
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        step = sums.first_non_finite_step()
        where = f"at step {step}" if step is not None else f"by step {progress.step} (the sum overflowed)"
        raise TrainingDivergedError(f"{model.name}: loss became {_non_finite(losses[bad[0]])} {where} "
                                    f"({', '.join(bad)}){_diverged_advice(base_lrs, progress)}")
    t_val = time.perf_counter()
    _set_mode(model, train=False)
    with torch.no_grad():
        val = model.validate()
    _set_mode(model, train=True)
    t_end = time.perf_counter()
    score = float(val["score"])
    if not math.isfinite(score):
        raise TrainingDivergedError(f"{model.name}: validation score became {_non_finite(score)} at step "
                                    f"{progress.step}{_diverged_advice(base_lrs, progress)}")
    row = {"step": progress.step, "total_steps": schedule.total_steps,
           "epoch": round(progress.step / schedule.steps_per_epoch, 4),
           **{k: v / max(n_since, 1) for k, v in losses.items()},
           **{f"val_{k}": float(v) for k, v in val.items()}, "lr_factor": factor,
           "seconds": t_end - t_since, "seconds_validating": t_end - t_val}
    progress.history.append(row)
    if score > progress.patience_score + schedule.min_improvement:
        progress.patience_score, progress.bad_validations = score, 0
    else:
        progress.bad_validations += 1
    improved = score > progress.best_score
    if improved:
        progress.best_score, progress.best_step = score, progress.step
    stop = (schedule.patience > 0 and progress.bad_validations >= schedule.patience
            and progress.step >= schedule.min_steps)
    progress.stopped_early = stop and progress.step < schedule.total_steps
    progress.finished = stop or progress.step >= schedule.total_steps
    return row, improved


class _CheckpointWriter:
    """Writes best.pt and last.pt after a validation: every time (``every_s`` 0), or once ``every_s``
    seconds have passed since the last write and when training ends, keeping the newest best state in
    host memory in between. best.pt is written before the last.pt that names its digest."""

    def __init__(self, last_path: Path, best_path: Path, every_s: float, clock: Callable[[], float]) -> None:
        self.last_path, self.best_path, self.every_s, self.clock = last_path, best_path, float(every_s), clock
        self.last_write = clock()
        self.pending_best: dict[str, Any] | None = None

    def after_validation(self, payload: dict[str, Any], progress: _Progress, improved: bool, force: bool) -> None:
        """``force``: fit returns after this validation (the schedule ended, stopped early, or
        ``max_validations_this_call``), so the checkpoints must be on disk."""
        due = self.every_s <= 0 or force or self.clock() - self.last_write >= self.every_s
        if improved:
            self.pending_best = payload if due else _host_copy(payload)
        if not due:
            return
        if self.pending_best is not None:
            progress.best_sha256 = save_checkpoint(self.best_path, self.pending_best)
            self.pending_best = None
        payload["progress"]["best_sha256"] = progress.best_sha256
        save_checkpoint(self.last_path, payload)
        self.last_write = self.clock()


def _host_copy(value: Any) -> Any:
    """A deep copy whose tensors live in host memory (a state_dict holds references to live weights)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


def _log_line(name: str, schedule: Schedule, progress: _Progress, row: dict[str, float]) -> str:
    skip = {"step", "total_steps", "epoch", "lr_factor", "seconds", "seconds_validating"}
    values = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in skip)
    best = f"best={progress.best_score:.4g}@{progress.best_step}"
    end = " early stop" if progress.stopped_early else ""
    return (f"{name}: step {progress.step}/{schedule.total_steps} (epoch {row['epoch']:.2f}) {values} {best} "
            f"lr_factor={row['lr_factor']:.3g} seconds={row['seconds']:.1f} "
            f"(validating {row['seconds_validating']:.1f}){end}")


def _payload(model: Trainable, schedule: Schedule, identity: CheckpointIdentity, progress: _Progress) -> dict[str, Any]:
    epoch = round(progress.step / schedule.steps_per_epoch, 4)
    return {
        "meta": {**identity.meta, "step": progress.step, "epoch": epoch},
        "config_json": identity.config_json,
        "schedule": asdict(schedule),
        "progress": {k: v for k, v in asdict(progress).items() if k != "history"},
        "modules": {k: m.state_dict() for k, m in model.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in model.optimizers().items()},
        "rng_cpu": torch.get_rng_state(),
        "history": progress.history,
    }


def _restore(model: Trainable, state: dict[str, Any]) -> None:
    for k, m in model.modules().items():
        m.load_state_dict(state["modules"][k])
    for k, o in model.optimizers().items():
        o.load_state_dict(state["optimizers"][k])
    torch.set_rng_state(state["rng_cpu"])


def _base_lrs(model: Trainable) -> dict[str, list[float]]:
    """Each param group's lr before any scaling (``initial_lr``, kept in the optimiser state)."""
    out = {}
    for k, opt in model.optimizers().items():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        out[k] = [float(g["initial_lr"]) for g in opt.param_groups]
    return out


def _set_lr(model: Trainable, base_lrs: dict[str, list[float]], factor: float) -> None:
    for k, opt in model.optimizers().items():
        for group, base in zip(opt.param_groups, base_lrs[k]):
            group["lr"] = base * factor


def _set_mode(model: Trainable, train: bool) -> None:
    for module in model.modules().values():
        module.train(train)


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _diverged_advice(base_lrs: dict[str, list[float]], progress: _Progress) -> str:
    """The rest of a TrainingDivergedError's line: the learning rates, what to do, what was kept."""
    lrs = ", ".join(f"{name} {group[0]:.3g}" for name, group in base_lrs.items() if group)
    kept = (f"; nothing after step {progress.history[-1]['step']:.0f} was saved" if progress.history
            else "; no checkpoint was saved")
    return (f"; training diverged at learning rate {lrs}: lower the learning rate (or the loss weights) "
            f"and train again{kept}")


def _schedule_text(s: dict[str, Any] | None) -> str:
    if not isinstance(s, dict):
        return "none recorded"
    return f"{s.get('kind')}, {s.get('total_steps')} steps of {s.get('steps_per_epoch')} per epoch"

