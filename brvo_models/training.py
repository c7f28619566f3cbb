"""The training contract the two GANs follow, and the epoch loop that drives it.

Pix2Pix and CRGAN implement :class:`Trainable` (the small segmenters of the usefulness
experiment train for a fixed number of steps in a loop of their own, with no checkpoints):
named modules, optimisers and lr schedulers, a ``train_step`` on one batch and a
``validate`` that returns metrics with a ``score`` (higher is better). :func:`fit`
owns everything around that: epochs, resume from ``last.pt``, atomic checkpoints
every epoch (weights, optimiser and scheduler states, RNG state, epoch, metrics
history, the model's self-description from :mod:`brvo_models.identity`; sha256 beside
each), ``best.pt`` on the validation score, and progress callbacks. Because shuffling
is seeded per epoch and the torch RNG is saved, a run killed after epoch k and resumed
ends, on CPU, with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from brvo_models.identity import CheckpointIdentity
from storage.checkpoints import load_checkpoint, save_checkpoint

LAST = "last.pt"
BEST = "best.pt"


class Trainable(Protocol):
    name: str

    def modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def schedulers(self) -> dict[str, Any]: ...

    def train_step(self, batch: Any) -> dict[str, float]: ...

    def validate(self) -> dict[str, float]: ...


@dataclass
class FitResult:
    last_path: Path
    best_path: Path
    best_sha256: str
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0


def fit(
    model: Trainable,
    batches: Callable[[int], Iterable[Any]],
    *,
    epochs: int,
    checkpoint_dir: Path,
    identity: CheckpointIdentity,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    max_epochs_this_call: int | None = None,
) -> FitResult:
    """Train ``model`` to ``epochs`` total epochs, resuming from ``checkpoint_dir/last.pt`` when present.

    ``batches(epoch)`` yields the batches of one epoch (seed its shuffling with the epoch).
    ``identity`` (:class:`brvo_models.identity.CheckpointIdentity`) describes every checkpoint
    written and is checked on resume, so a checkpoint from another model, config, seed or image
    size is refused before anything is overwritten.
    ``max_epochs_this_call`` stops early (used by tests to simulate a kill).
    """
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    start_epoch, history = 0, []
    best_score, best_epoch, best_sha = float("-inf"), -1, ""
    if last_path.exists():
        state = load_checkpoint(last_path, expect=identity.meta)
        _restore(model, state)
        start_epoch = int(state["epoch"])
        history = list(state.get("history", []))
        best_score = float(state.get("best_score", float("-inf")))
        best_epoch = int(state.get("best_epoch", -1))
        best_sha = str(state.get("best_sha256", ""))
        log(f"{model.name}: resuming from {last_path} after epoch {start_epoch}")
    t_start = time.perf_counter()
    stop_at = epochs if max_epochs_this_call is None else min(epochs, start_epoch + max_epochs_this_call)
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        for module in model.modules().values():
            module.train()
        sums: dict[str, float] = {}
        n_steps = 0
        for batch in batches(epoch):
            for k, v in model.train_step(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps += 1
        for sched in model.schedulers().values():
            sched.step()
        for module in model.modules().values():
            module.eval()
        with torch.no_grad():
            val = model.validate()
        row = {"epoch": epoch + 1, **{k: v / max(n_steps, 1) for k, v in sums.items()},
               **{f"val_{k}": float(v) for k, v in val.items()}, "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = float(val["score"]) > best_score
        if improved:
            best_score, best_epoch = float(val["score"]), epoch + 1
        payload = _payload(model, epoch + 1, identity, history, best_score, best_epoch, best_sha)
        if improved:
            best_sha = save_checkpoint(best_path, payload)
            payload["best_sha256"] = best_sha
        save_checkpoint(last_path, payload)
        log(f"{model.name}: epoch {epoch + 1}/{epochs} " + " ".join(
            f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(row)
    if not best_path.exists():
        raise RuntimeError(f"{model.name}: no epoch was trained and no best checkpoint exists")
    best_row = next((r for r in history if r["epoch"] == best_epoch), history[-1] if history else {})
    return FitResult(last_path=last_path, best_path=best_path, best_sha256=best_sha or "",
                     best_epoch=best_epoch, best_metrics=best_row, history=history,
                     resumed_from_epoch=start_epoch, seconds=time.perf_counter() - t_start)


def _payload(model, epoch, identity, history, best_score, best_epoch, best_sha) -> dict[str, Any]:
    return {
        "meta": {**identity.meta, "epoch": epoch},
        "epoch": epoch,
        "config_json": identity.config_json,
        "modules": {k: m.state_dict() for k, m in model.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in model.optimizers().items()},
        "schedulers": {k: s.state_dict() for k, s in model.schedulers().items()},
        "rng_cpu": torch.get_rng_state(),
        "history": history,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "best_sha256": best_sha,
    }


def _restore(model: Trainable, state: dict[str, Any]) -> None:
    for k, m in model.modules().items():
        m.load_state_dict(state["modules"][k])
    for k, o in model.optimizers().items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in model.schedulers().items():
        s.load_state_dict(state["schedulers"][k])
    torch.set_rng_state(state["rng_cpu"])
