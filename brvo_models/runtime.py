"""Device choice, seeding and mixed precision shared by every model's training loop."""
from __future__ import annotations

import contextlib
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


def autocast(device: torch.device):
    """bf16/fp16 autocast on CUDA (mixed precision), a no-op on CPU (keeps CPU runs bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the Tanh output range every model here uses)."""
    return x * 2.0 - 1.0
