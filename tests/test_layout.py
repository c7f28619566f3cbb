"""The house's layout: tasks/ holds the steps, each step says what it reads and uses what it is handed."""
from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from tasks.config import preset
from tasks.engine import Step, StepContext, assert_valid_plan, run_plan

ROOT = Path(__file__).resolve().parents[1]


def _top_level_task_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__")


def _steps_of(module) -> list[Step]:
    return [value for value in vars(module).values() if isinstance(value, Step)]


def _all_plans():
    from flows.augment import AUGMENT
    from flows.prepare import PREPARE
    from flows.retrain import retrain_plan
    from tasks.analyses.usefulness_subsets import SUBSET_PLAN

    return {"augment": AUGMENT, "prepare": PREPARE, "retrain": retrain_plan(), "usefulness subset": SUBSET_PLAN}


def test_every_module_at_tasks_top_level_is_one_step_named_as_the_module():
    modules = _top_level_task_modules()
    assert modules, "tasks/ holds the steps"
    for name in modules:
        module = importlib.import_module(f"tasks.{name}")
        steps = _steps_of(module)
        declared = [s for s in steps if inspect.unwrap(s.run).__module__ == module.__name__]
        assert len(declared) == 1, f"tasks/{name}.py declares {[s.name for s in declared]}: one step per module"
        assert declared[0].name == name, f"tasks/{name}.py declares step {declared[0].name!r}: name them alike"


def test_every_step_of_the_augment_plan_lives_in_its_own_module():
    from flows.augment import AUGMENT

    assert sorted(s.name for s in AUGMENT) == _top_level_task_modules()


def _names_used(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    body = tree.body[0]
    return {node.id for node in ast.walk(body) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


@pytest.mark.parametrize("plan_name", ["augment", "prepare", "retrain", "usefulness subset"])
def test_no_step_function_ignores_an_upstream_result_it_is_passed(plan_name):
    for step in _all_plans()[plan_name]:
        fn = inspect.unwrap(step.run)
        params = list(inspect.signature(fn).parameters)[1:]
        assert params == list(step.needs), f"{step.name}: takes {params}, needs {list(step.needs)}"
        ignored = [need for need in step.needs if need not in _names_used(fn)]
        assert not ignored, f"step {step.name!r} is handed {ignored} and never looks at it"


def test_every_read_is_written_by_a_step_the_reader_needs():
    for name, plan in _all_plans().items():
        assert_valid_plan(plan)
        for step in plan:
            if step.name in ("pix2pix", "crgan", "fill", "label", "score", "export", "figures", "image_quality",
                             "usefulness", "preprocess"):
                assert step.reads or step.reads_source, f"{name}: step {step.name!r} declares no reads"


class Out(BaseModel):
    text: str


def _write_manifest(ctx: StepContext) -> Out:
    ctx.paths.manifest.write_text("x\n")
    return Out(text=str(ctx.paths.manifest))


def _read_manifest(ctx: StepContext, first: Out) -> Out:
    ctx.paths.soul_h5.write_text(Path(first.text).read_text())
    return Out(text=str(ctx.paths.soul_h5))


FIRST = Step("first", _write_manifest, Out, writes=("manifest",))


def test_a_read_that_no_needed_step_writes_is_refused_before_anything_runs(tmp_path):
    reads_unwritten = Step("second", _read_manifest, Out, needs=("first",), reads=("stage_table",), writes=("soul_h5",))
    with pytest.raises(ValueError, match="reads 'stage_table', which none of its needs"):
        assert_valid_plan((FIRST, reads_unwritten))
    with pytest.raises(ValueError, match="reads 'stage_table'"):
        run_plan((FIRST, reads_unwritten), StepContext(run_dir=tmp_path, config=preset("tiny"), log=lambda _m: None))
    assert not (tmp_path / "manifest.csv").exists(), "the plan was refused before its first step ran"
    unknown = Step("second", _read_manifest, Out, needs=("first",), reads=("no_such_file",))
    with pytest.raises(ValueError, match="unknown RunPaths attribute 'no_such_file'"):
        assert_valid_plan((FIRST, unknown))


def test_a_declared_input_that_is_not_there_fails_the_step_before_it_runs(tmp_path):
    def claims_a_manifest(ctx: StepContext) -> Out:
        return Out(text="")  # declares it writes manifest.csv but writes nothing

    liar = Step("first", claims_a_manifest, Out, writes=())
    second = Step("second", _read_manifest, Out, needs=("first",), reads=("manifest",), writes=("soul_h5",))
    with pytest.raises(ValueError):
        assert_valid_plan((liar, second))  # manifest is not among first's writes
    from tasks.engine import compute_step

    ctx = StepContext(run_dir=tmp_path, config=preset("tiny"), log=lambda _m: None)
    with pytest.raises(RuntimeError, match="declares it reads .*manifest.csv"):
        compute_step(second, ctx, {"first": Out(text=str(tmp_path / "manifest.csv"))}, "key")


def test_importing_the_steps_installs_no_log_filter():
    """The one-line-errors filter is installed where a flow or the CLI starts, never as an import side effect."""
    code = textwrap.dedent("""
        import logging
        import flows.augment, flows.retrain, tasks.engine  # every step and the engine
        from tasks.engine.logs import PREFECT_RUN_LOGGERS, install_one_line_errors
        assert not any(logging.getLogger(n).filters for n in PREFECT_RUN_LOGGERS), "installed on import"
        install_one_line_errors()
        assert all(logging.getLogger(n).filters for n in PREFECT_RUN_LOGGERS)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
