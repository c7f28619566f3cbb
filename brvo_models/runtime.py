"""Device choice, seeding and mixed precision shared by every model's training loop."""
from __future__ import annotations

import contextlib
import contextvars
import random

import numpy as np
import torch


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' fails clearly when there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from storage.errors import BrvoError

        raise BrvoError("device 'cuda' requested but no CUDA GPU is visible; use device=auto or cpu")
    return torch.device(name)


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch.device as given, or a name ('auto', 'cpu', 'cuda', ...) through :func:`select_device`."""
    return device if isinstance(device, torch.device) else select_device(str(device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


#: A model config's ``precision``: 'auto' is bf16 autocast on CUDA and plain fp32 on the CPU (bit-reproducible
#: there); 'fp32' and 'bf16' ask for one of them on any device (bf16 autocast on a CPU runs convolutions and
#: matmuls in bfloat16, fast where the CPU has native bf16 instructions; docs/performance.md has the verdict).
PRECISIONS = ("auto", "fp32", "bf16")
_precision: contextvars.ContextVar[str] = contextvars.ContextVar("brvo_precision", default="auto")


def resolve_precision(device: torch.device, precision: str | None = None) -> str:
    """'fp32' or 'bf16': ``precision`` (None: the one :func:`precision_scope` set, else 'auto') on ``device``."""
    name = _precision.get() if precision is None else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, precision: str | None = None):
    """The autocast context of ``precision`` on ``device`` (see :data:`PRECISIONS`); a no-op for fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def precision_scope(precision: str | None):
    """Inside, :func:`autocast` without an explicit precision uses ``precision`` (None: leaves it as it is).

    Why a scope: the models' forward passes call ``autocast(device)`` in many places; the training loop
    (brvo_models.training.fit) sets its model config's precision once around them."""
    if precision is None:
        yield
        return
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    token = _precision.set(precision)
    try:
        yield
    finally:
        _precision.reset(token)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the Tanh output range every model here uses)."""
    return x * 2.0 - 1.0
