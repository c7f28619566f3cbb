"""Which steps run at once, on which GPU, and how many trainings share a GPU.

* **At once, on CUDA only.** The two trainings need nothing from each other. When the run's
  device is CUDA (``concurrent_steps`` "auto", the default) :func:`group_executor` gives the
  step driver (:func:`tasks.engine.driver.run_plan`) a group executor, and it submits such steps together
  to the flow's task runner. The augment and retrain flows run on
  :func:`step_task_runner`, a Prefect ``ProcessPoolTaskRunner``: each submitted step gets a
  process of its own, so the trainings do not share the global torch RNG (each stays
  reproducible on its own, as when run alone), nor the GIL (batch-1 Pix2Pix is bound by the
  host's kernel launches, which two threads of one process would serialise). On the CPU the
  order stays sequential: two trainings on the same cores gain nothing and the results stay
  bit-for-bit those of every earlier run. ``concurrent_steps`` "on"/"off" force it either way.
* **One GPU each where there are several** (:func:`spread_over_gpus`): with ``device`` "auto" or
  "cuda" and two or more GPUs, the i-th device step of a group trains on cuda:i. One GPU: shared.
* **A GPU's slots across runs** (tasks.engine.device_slots): a training holds one slot of the Prefect
  global concurrency limit ``brvo-gpu-<index>`` while it computes, so several runs on one
  machine (deployments, sweeps) share a GPU as the user decides:
  ``prefect gcl create brvo-gpu-0 --limit 2``. Without that limit there is nothing to hold:
  Prefect's ``concurrency()`` would log a WARNING and go on (``strict=False``) or fail
  (``strict=True``); here the missing limit is looked up first and reported on one INFO line,
  so a run needs no server-side setup and WARNING lines keep meaning a missed quality bar.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from tasks.config import PipelineConfig
from tasks.engine.driver import Executor, GroupExecutor, StepCall, run_together_in_threads
from tasks.engine.prefect_adapter import execute_with_prefect, submit_with_prefect


def concurrent_steps_enabled(config: PipelineConfig) -> bool:
    """Whether independent steps run at once: ``concurrent_steps`` "on"/"off", or "auto": on a CUDA device."""
    if config.concurrent_steps != "auto":
        return config.concurrent_steps == "on"
    from brvo_models.runtime import select_device

    return select_device(config.device).type == "cuda"


def group_executor(config: PipelineConfig, execute: Executor) -> GroupExecutor | None:
    """What :func:`tasks.engine.driver.run_plan` hands independent steps to, or None: one at a time, in plan order."""
    if not concurrent_steps_enabled(config):
        return None
    if execute is execute_with_prefect:
        return lambda calls: submit_with_prefect(spread_over_gpus(calls))
    return lambda calls: run_together_in_threads(spread_over_gpus(calls), execute)


def spread_over_gpus(calls: Sequence[StepCall], n_gpus: int | None = None) -> list[StepCall]:
    """The device steps of a group on cuda:0, cuda:1, ... when the config leaves the GPU open ("auto" or
    "cuda") and there are two or more; every other call as it is. The step keys do not change (the
    trainings' keys hold no device), so a result is served whichever GPU made it."""
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out, k = [], 0
    for call in calls:
        if call.step.uses_device and n_gpus >= 2 and call.ctx.config.device in ("auto", "cuda"):
            config = call.ctx.config.with_overrides(device=f"cuda:{k % n_gpus}")
            call = replace(call, ctx=replace(call.ctx, config=config))
            k += 1
        out.append(call)
    return out


def step_task_runner(max_workers: int = 2):
    """The task runner of the flows that run steps at once: a process per submitted step."""
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=max_workers)


