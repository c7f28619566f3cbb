"""docs/design.md, "Adding a step", followed for a toy step: it runs through the CLI, the augment flow and a
low-data sub-run, each time computed once and then served from its record."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel

from storage import report_schema
from storage.paired_format import read_meta
from storage.run_dir import RunPaths
from tasks.engine import Step, StepCommand, StepContext
from tasks.shared.preflight import require_soul_h5

CALLS: list[Path] = []


# 6. its report section: a model in storage/report_schema.py and a field of Report named as the section
class StageRowsSection(report_schema.Section):
    rows_per_stage: dict[int, int]


class ReportWithStageRows(report_schema.Report):
    stage_rows: StageRowsSection | None = None


# 1. its module: a result type, the plain function (inputs from the results it is handed), the declaration
class StageRows(BaseModel):
    csv: str
    rows_per_stage: dict[int, int]

    def report_section(self) -> StageRowsSection:
        return StageRowsSection(rows_per_stage=self.rows_per_stage)


def stage_rows_step(ctx: StepContext, preprocess) -> StageRows:
    """Rows per stage of the run's soul.h5."""
    CALLS.append(ctx.run_dir)
    counts = read_meta(preprocess.path).groupby("stage").size()
    out = ctx.paths.stage_rows_csv
    counts.to_csv(out)
    return StageRows(csv=str(out), rows_per_stage={int(k): int(v) for k, v in counts.items()})


STAGE_ROWS = Step(
    name="stage_rows", run=stage_rows_step, result_type=StageRows, needs=("preprocess",), reads=("soul_h5",),
    writes=("stage_rows_csv",), config_fields=("image_size",), report="stage_rows",
    # 5. its command, with a preflight that runs before Prefect starts
    command=StepCommand("stage-rows", "rows per stage of RUN_DIR/soul.h5",
                        preflight=lambda ctx: require_soul_h5(ctx.run_dir, ctx.config.image_size, lambda size: None)))


@pytest.fixture
def toy_step(monkeypatch):
    """Steps 2, 4 and 6: its file as a RunPaths property, its place in the augment plan, its report section."""
    import flows.augment
    import flows.plans

    monkeypatch.setattr(report_schema, "Report", ReportWithStageRows)
    monkeypatch.setattr(RunPaths, "stage_rows_csv", property(lambda self: self.root / "stage_rows.csv"), raising=False)
    plan = flows.plans.AUGMENT + (STAGE_ROWS,)
    monkeypatch.setattr(flows.plans, "AUGMENT", plan)
    monkeypatch.setattr(flows.augment, "AUGMENT", plan)
    CALLS.clear()
    return STAGE_ROWS


def _copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_the_toy_step_runs_alone_from_the_cli_and_is_then_served(toy_step, tiny_augment_run, tmp_path, capsys):
    from flows.cli import main

    _, run_dir, _ = tiny_augment_run
    run = _copy_of(run_dir, tmp_path)
    assert main(["stage-rows", str(run)]) == 0, capsys.readouterr().err
    assert CALLS == [run.resolve()]
    report = json.loads((run / "report.json").read_text())
    counts = report["stage_rows"]["rows_per_stage"]
    assert sum(counts.values()) == len(read_meta(run / "soul.h5")) and (run / "stage_rows.csv").exists()
    assert "pix2pix" in report and "usefulness" in report  # the finished steps keep their sections
    assert main(["stage-rows", str(run)]) == 0
    assert len(CALLS) == 1, "served from its record the second time"
    (run / "stage_rows.csv").unlink()  # its output gone: it recomputes
    assert main(["stage-rows", str(run)]) == 0 and len(CALLS) == 2


def test_the_toy_step_runs_in_the_augment_flow_and_is_then_served(toy_step, tiny_augment_run, tmp_path):
    from flows.augment import augment

    soul, run_dir, _ = tiny_augment_run
    run = _copy_of(run_dir, tmp_path)
    first = augment(soul_dir=str(soul), run_dir=str(run), preset="tiny")
    assert CALLS == [run.resolve()] and first["n_real"] > 0
    assert "stage_rows" in json.loads((run / "report.json").read_text())
    augment(soul_dir=str(soul), run_dir=str(run), preset="tiny")
    assert len(CALLS) == 1, "served from its record the second time"


def test_the_toy_step_runs_in_a_sub_run_and_is_then_served(toy_step, tiny_augment_run, tmp_path):
    from tasks.analyses.usefulness_protocol import SubsetRequest
    from tasks.analyses.usefulness_subsets import SUBSET_SOUL, write_request
    from tasks.config import preset
    from tasks.engine import execute_plainly, run_plan

    _, run_dir, _ = tiny_augment_run
    meta = read_meta(run_dir / "soul.h5")
    train = sorted(meta.loc[meta["split"] == "train", "patient_id"].unique())
    val = sorted(meta.loc[meta["split"] == "val", "patient_id"].unique())
    request = SubsetRequest(soul_h5=run_dir / "soul.h5", train_patients=tuple(train[:2]),
                            selection_patients=tuple(val), seed=0, work_dir=tmp_path / "sub")
    ctx = StepContext(run_dir=tmp_path / "sub", config=preset("tiny"), source=write_request(request),
                      log=lambda _m: None)
    run = run_plan((SUBSET_SOUL, STAGE_ROWS), ctx, execute=execute_plainly)
    assert run.cached == [] and CALLS == [tmp_path / "sub"]
    assert set(run.result("stage_rows").rows_per_stage) <= set(range(6))
    again = run_plan((SUBSET_SOUL, STAGE_ROWS), ctx, execute=execute_plainly)
    assert again.cached == ["preprocess", "stage_rows"] and len(CALLS) == 1
