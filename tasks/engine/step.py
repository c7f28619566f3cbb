"""A pipeline step, declared once: its function, what it reads and writes, and what its result depends on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

#: What a result's ``report_section()`` returns: the pydantic model of its section in
#: storage.report_schema (a field of ``Report``, named by ``Step.report``).
ReportSection = BaseModel

from storage.run_dir import RunPaths
from tasks.config import PipelineConfig
from tasks.engine.logs import LogFn, run_log


def config_fields(config: PipelineConfig, names: tuple[str, ...], owner: str = "a cache key") -> dict[str, Any]:
    """{name: value} of ``config``'s fields ``names`` (dotted for a model's field, e.g. ``pix2pix.precision``),
    as JSON values; an unknown name is a KeyError naming its ``owner``."""
    data = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name in names:
        value: Any = data
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(f"{owner} declares unknown config field {name!r}")
            value = value[part]
        out[name] = value
    return out


@dataclass(frozen=True)
class StepContext:
    """What every step function receives besides its upstream results."""

    run_dir: Path
    config: PipelineConfig
    source: Path | None = None  # the SOUL directory or manifest CSV (steps with reads_source)
    log: LogFn = run_log
    key: str = ""  # the running step's cache key (set by the driver for each step)

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.run_dir)


#: The command line program every :class:`StepCommand` belongs to.
PROGRAM = "brvo-augment"


@dataclass(frozen=True)
class StepCommand:
    """How a user runs one step alone on a run directory: ``brvo-augment NAME [SOUL_DIR] RUN_DIR``.

    The CLI builds its single-step subcommands from these (flows/cli.py), so a command, its help and its
    preflight are declared beside the step they run. ``preflight(ctx)`` makes the step's cheap input
    checks (a one-line BrvoError) before Prefect starts; ``config_options``: the command takes
    ``--preset``/``--config``; ``quality_bars``: it takes ``--require-bars``.
    """

    name: str
    help: str
    preflight: Callable[["StepContext"], object] | None = None
    config_options: bool = True
    quality_bars: bool = False

    def usage(self, run_dir: str | Path, reads_source: bool) -> str:
        return f"{PROGRAM} {self.name} {'SOUL_DIR ' if reads_source else ''}{run_dir}"


@dataclass(frozen=True)
class Step:
    """One pipeline step, declared once.

    ``run(ctx, **needs)`` is the plain step function: it receives a :class:`StepContext` and
    one keyword argument per name in ``needs`` (that step's result, where it finds its inputs)
    and returns a pydantic ``result_type``. ``reads`` are the RunPaths attributes of the files
    it reads, each written by one of its ``needs``; ``writes`` those of the files (or
    directories) it owns; a result may list further files in an ``output_files()`` method (e.g. checkpoints
    held outside the run directory by the model registry). ``config_fields`` are the
    PipelineConfig fields its result depends on (dotted for a model's field, e.g.
    ``pix2pix.threshold``). ``report`` is the report.json section its result fills: a field of
    :class:`storage.report_schema.Report`, and ``result_type.report_section()`` returns that
    field's model (:data:`ReportSection`); a section Report does not declare is refused when the
    report is built. ``cache`` False: the step always runs (cheap steps whose outputs are views of
    other results, e.g. the documents).
    """

    name: str
    run: Callable[..., BaseModel]
    result_type: type[BaseModel]
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    config_fields: tuple[str, ...] = ()
    reads_source: bool = False
    report: str | None = None
    cache: bool = True
    retries: int = 0
    description: str = ""
    uses_device: bool = False  # trains on the run's device: holds a GPU slot (tasks.engine.concurrency) there
    command: StepCommand | None = None  # the CLI subcommand that runs it alone; None: only whole flows run it

    def config_slice(self, config: PipelineConfig) -> dict[str, Any]:
        return config_fields(config, self.config_fields, owner=f"step {self.name!r}")

    def output_paths(self, paths: RunPaths) -> list[Path]:
        return [getattr(paths, attr) for attr in self.writes]

    def input_paths(self, paths: RunPaths) -> list[Path]:
        return [getattr(paths, attr) for attr in self.reads]

    def how_to_make(self, run_dir: str | Path) -> str:
        """The command that makes this step's result in ``run_dir``: its own, else the whole flow's."""
        if self.command is not None:
            return self.command.usage(run_dir, self.reads_source)
        return f"{PROGRAM} run SOUL_DIR {run_dir}"


