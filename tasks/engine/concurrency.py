"""Which steps run at once, and on which GPU.

On CUDA (``concurrent_steps`` "auto"), steps that need nothing from each other (the two trainings) go to
the flow's task runner together, a process each (:func:`step_task_runner`), one GPU each where there
are several (:func:`spread_over_gpus`); on the CPU the order stays sequential and bit-reproducible.
The reasons, and the GPU slots across runs (tasks.engine.device_slots): docs/steps.md.
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


