"""report.json has one schema (storage.report_schema): a run writes it as strict JSON, every reader validates
it, a bad field is a one-line error naming it, an older run's report still loads, and no step can fill a
section the schema does not type."""
from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from storage.errors import BrvoError
from storage.report_schema import Report, load_report, without_nan

#: A report.json written by the code before the schema (commit e371cca, tiny preset, 8-patient phantom).
BEFORE_SCHEMA = Path(__file__).parent / "fixtures" / "report_before_schema.json"


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_tiny_runs_report_is_strict_json_and_validates(tiny_augment_run):
    from flows.plans import AUGMENT

    _, run_dir, _ = tiny_augment_run
    text = (run_dir / "report.json").read_text()
    data = _strict_json(text)  # no NaN: a number that was not measured is null
    report = load_report(run_dir / "report.json")
    assert report.to_json() == data, "a load and a dump give back the file's content"
    declared = {step.report for step in AUGMENT if step.report}
    assert declared <= set(data), f"sections missing from the run's report: {declared - set(data)}"
    assert 0 <= report.pix2pix.test.dice <= 1 and set(report.pix2pix.baselines) >= {"otsu", "frangi"}
    assert report.crgan.heldout.model.ssim is not None and report.synthetic.n == sum(
        s.synthetic for s in report.synthetic.per_stage.values())
    assert report.timings_s.total is not None and set(report.bars) and report.config["preset"] == "tiny"


def test_a_wrong_typed_field_is_a_one_line_error_naming_the_file_and_the_field(tmp_path):
    data = json.loads(BEFORE_SCHEMA.read_text())
    data["pix2pix"]["test"]["dice"] = "very good"
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(BrvoError) as caught:
        load_report(bad)
    message = str(caught.value)
    assert "\n" not in message and str(bad) in message and "pix2pix.test.dice" in message
    # an undeclared section is refused too: nothing untyped is read as if it were the report
    data = json.loads(BEFORE_SCHEMA.read_text())
    data["stage_rows"] = {"anything": 1}
    bad.write_text(json.dumps(data))
    with pytest.raises(BrvoError, match="stage_rows"):
        load_report(bad)
    bad.write_text("{not json")
    with pytest.raises(BrvoError, match="not a readable report.json"):
        load_report(bad)


def test_a_report_written_before_the_schema_loads_unchanged():
    original = json.loads(BEFORE_SCHEMA.read_text())  # it holds NaN: the old writer allowed them
    report = load_report(BEFORE_SCHEMA)
    assert report.to_json() == without_nan(original), "same names, same nesting; NaN read back as null"
    assert report.pix2pix.n_test_patients == original["pix2pix"]["n_test_patients"]
    assert report.usefulness.comparisons[0].verdict == original["usefulness"]["comparisons"][0]["verdict"]
    assert report.figures.root == original["figures"]


def test_the_usefulness_section_accepts_the_protocols_new_keys():
    data = json.loads(BEFORE_SCHEMA.read_text())
    data["usefulness"]["gate"] = {"segmentation": {"verdict": "not measurable here (flat curve)"}}
    data["usefulness"]["comparisons"][0].update(verdict="not enough seeds", alternative="cheapest")
    report = Report.model_validate(data)
    assert report.usefulness.comparisons[0].verdict == "not enough seeds"
    assert report.to_json()["usefulness"]["gate"] == data["usefulness"]["gate"]


def _section_models(annotation) -> set[type]:
    """The model classes an annotation names (through unions and Optional)."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation} if isinstance(annotation, type) else set()
    return set().union(*(_section_models(a) for a in args)) - {type(None)}


def _plans():
    from flows.augment import augment_plan
    from flows.plans import AUGMENT, RETRAIN
    from flows.prepare import PREPARE
    from storage.registry import RegisteredModels
    from tasks.analyses.usefulness_subsets import SUBSET_PLAN

    registry = RegisteredModels(version="v0001", dir=Path("."), pix2pix_checkpoint=Path("p.pt"),
                                crgan_checkpoint=Path("c.pt"), config={}, metrics={}, sha256s={})
    return {"augment": AUGMENT, "retrain": RETRAIN, "prepare": PREPARE, "subset": SUBSET_PLAN,
            "augment from the registry": augment_plan(registry)}


def test_every_section_a_step_declares_has_a_model():
    seen = set()
    for plan_name, plan in _plans().items():
        for step in plan:
            if not step.report:
                continue
            seen.add(step.report)
            where = f"{plan_name}: step {step.name!r} section {step.report!r}"
            assert step.report in Report.model_fields, f"{where}: not a field of storage.report_schema.Report"
            method = getattr(step.result_type, "report_section", None)
            assert method is not None, f"{where}: {step.result_type.__name__} has no report_section()"
            returned = _section_models(typing.get_type_hints(method)["return"])
            field = _section_models(Report.model_fields[step.report].annotation)
            assert returned and all(issubclass(m, BaseModel) for m in returned), \
                f"{where}: report_section() must return the section's model, not {returned}"
            assert returned & field, f"{where}: report_section() returns {returned}, the schema types it {field}"
    assert {"pix2pix", "crgan", "synthetic", "figures", "image_quality", "usefulness"} <= seen


def test_a_step_with_a_section_the_schema_does_not_declare_is_refused():
    from tasks.config import preset
    from tasks.engine import PlanRun, Step, StepOutcome
    from tasks.rendering.report import build_report

    class Untyped(BaseModel):
        def report_section(self) -> BaseModel:
            return self

    step = Step(name="toy", run=lambda ctx: Untyped(), result_type=Untyped, report="toy_section")
    run = PlanRun(outcomes={"toy": StepOutcome("toy", Untyped(), cached=False, seconds=0.0, record=None)})
    with pytest.raises(ValueError, match="toy_section.*does not declare"):
        build_report((step,), run, preset("tiny"))
