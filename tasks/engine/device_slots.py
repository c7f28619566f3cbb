"""A GPU's slots across runs: a training holds one slot of the Prefect global concurrency limit
``brvo-gpu-<index>`` while it computes, so several runs on one machine (deployments, sweeps) share a GPU
as the user decides: ``prefect gcl create brvo-gpu-0 --limit 2``. Without that limit there is nothing
to hold: the missing limit is reported on one INFO line (Prefect's ``concurrency(strict=False)`` would
log a WARNING, and WARNING lines mean a missed quality bar here).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from tasks.engine.logs import LogFn, run_log

GPU_LIMIT_PREFIX = "brvo-gpu-"
_reported_missing: set[str] = set()


def gpu_limit_name(device) -> str | None:
    """``brvo-gpu-<index>`` for a CUDA device (name or torch.device), None for any other."""
    import torch

    from brvo_models.runtime import select_device

    device = device if isinstance(device, torch.device) else select_device(str(device))
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"{GPU_LIMIT_PREFIX}{index}"


@contextlib.contextmanager
def device_slot(device, log: LogFn = run_log) -> Iterator[None]:
    """Hold one slot of the GPU's global concurrency limit (:func:`limit_slot`) while the body runs;
    nothing to hold on a CPU."""
    name = gpu_limit_name(device)
    if name is None:
        yield
        return
    with limit_slot(name, log):
        yield


@contextlib.contextmanager
def limit_slot(name: str, log: LogFn = run_log) -> Iterator[None]:
    """One slot of the Prefect global concurrency limit ``name`` for the body; waits while all are taken.

    A limit that was never created limits nothing: the body runs at once and one INFO line per
    process says how to create it (Prefect's own ``concurrency(strict=False)`` would say so in a
    WARNING on every call)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        if name not in _reported_missing:
            _reported_missing.add(name)
            log(f"no Prefect concurrency limit '{name}': trainings on this GPU are not limited across runs "
                f"(to limit them: prefect gcl create {name} --limit 2)")
        yield
        return
    with concurrency(name, occupy=1, strict=True):
        yield
