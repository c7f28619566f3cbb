"""End to end: the augment flow on a tiny phantom under prefect_test_harness."""
import time

import pytest

from storage.paired_format import read_meta, validate
from storage.run_dir import RunPaths, read_report
from tasks.config import preset
from tasks.fill import missing_stages

pytestmark = pytest.mark.slow


def test_output_validates_and_fills_exactly_the_holes(tiny_augment_run):
    _, run_dir, result = tiny_augment_run
    paths = RunPaths.of(run_dir)
    summary = validate(paths.augmented_h5)
    meta = read_meta(paths.augmented_h5)
    real = meta[~meta["is_synthetic"]]
    syn = meta[meta["is_synthetic"]]
    k = preset("tiny").samples_per_missing
    holes = {(pid, s) for pid, stages in missing_stages(real).items() for s in stages}
    assert holes, "the tiny phantom must have missing stages"
    got = syn.groupby(["patient_id", "stage"]).size()
    assert set(got.index) == holes
    assert (got == k).all()
    assert summary.n_synthetic == len(holes) * k == result["n_synthetic"]
    assert set(syn["label_source"]) == {"pix2pix"} and set(real["label_source"]) == {"annotation"}
    assert syn["exam_id"].eq("").all()
    # every real patient keeps one split, and synthetic rows inherit it
    assert (meta.groupby("patient_id")["split"].nunique() == 1).all()


def test_outputs_pass_the_deep_format_check(tiny_augment_run):
    """Every chunk of both files read back and every value checked (.ci/run adds the independent checker)."""
    _, run_dir, result = tiny_augment_run
    assert validate(run_dir / "augmented.h5", deep=True).n_synthetic == result["n_synthetic"] > 0
    assert validate(run_dir / "soul.h5", deep=True).n_synthetic == 0


def test_documents_report_and_figures_written(tiny_augment_run):
    _, run_dir, _ = tiny_augment_run
    paths = RunPaths.of(run_dir)
    report = read_report(run_dir)
    for section in ("pix2pix", "crgan", "synthetic", "timings_s", "config", "versions", "usefulness", "image_quality"):
        assert section in report, section
    quality = report["image_quality"]
    assert set(quality["extractors"]) == {"random_cnn", "pix2pix_encoder"}
    meta = read_meta(paths.augmented_h5)
    real = meta[~meta["is_synthetic"]]
    assert quality["n_held_out_real"] == real["split"].isin(["val", "test"]).sum() > 0  # patients no model saw
    assert quality["n_train_real"] == (real["split"] == "train").sum()
    accepted = int((meta["is_synthetic"] & meta["accepted"]).sum())
    assert quality["n_synthetic"] == (accepted or int(meta["is_synthetic"].sum())) > 0
    pooled = quality["extractors"]["random_cnn"]["all"]
    assert pooled["n_synthetic"] == quality["n_synthetic"] and "baseline" in pooled
    assert {"dice", "iou", "cldice", "n"} <= set(report["pix2pix"]["test"])
    assert {"otsu", "frangi"} <= set(report["pix2pix"]["baselines"])
    assert {"nearest", "neighbour_mean"} <= set(report["crgan"]["heldout"]["baselines"])
    card = paths.dataset_card.read_text()
    assert "not for diagnosis" in card
    assert "Derived from the built-in phantom" in card and "Derived from SOUL" not in card  # the input is a phantom
    assert "## Pix2Pix" in paths.report_md.read_text()
    assert "## Image quality: synthetic vs held-out real images" in paths.report_md.read_text()
    trend = report["synthetic"]["stage_trend"]  # the treatment-effect check, measured on this run's own rows
    assert trend["n_synthetic_stages"] > 0 and trend["n_real_pairs"] > 0
    assert "## Treatment effect in the synthetic rows" in paths.report_md.read_text()
    montages = list((paths.figures / "timelines").glob("patient_*.png"))
    assert len(montages) == read_meta(paths.augmented_h5)["patient_id"].nunique()
    assert (paths.figures / "score_histograms.png").stat().st_size > 0
    assert (paths.figures / "training_curves.png").stat().st_size > 0


def test_second_run_reuses_cached_steps(tiny_augment_run):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.augment import augment

    soul_dir, run_dir, first = tiny_augment_run
    before = (run_dir / "augmented.h5").stat().st_mtime_ns
    state = augment(soul_dir=str(soul_dir), run_dir=str(run_dir), preset="tiny", return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    steps = ("ingest", "preprocess", "pix2pix", "crgan", "fill", "label", "score", "export", "figures", "image_quality",
             "usefulness")
    deadline = time.monotonic() + 30  # task-run states reach the API as events, a moment after the flow returns
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_name = {r.name.rsplit("-", 1)[0].replace("-", "_"): r.state.name for r in runs}  # task runs: image-quality-1a2
        if all(by_name.get(step) not in (None, "Pending", "Running") for step in steps) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for step in steps:
        assert by_name.get(step) == "Cached", (step, by_name)
    assert (run_dir / "augmented.h5").stat().st_mtime_ns == before
    timings = read_report(run_dir)["timings_s"]  # a rerun keeps the times of the run that did the work
    assert timings["pix2pix"] == first["timings_s"]["pix2pix"] > 0
    assert "pix2pix" in timings["cached"]
    assert "| pix2pix | " in (md := RunPaths.of(run_dir).report_md.read_text()) and "served from cache" in md


def test_a_deleted_report_or_work_file_is_rebuilt_and_nothing_else_reruns(tiny_augment_run):
    """Issue 14's reproductions on the real steps: deleting report.json rebuilds it whole from the step
    records (every step served); deleting work/scores.csv reruns the step that owns it, and only the steps
    whose inputs changed after it."""
    from flows.augment import AUGMENT
    from flows.run_steps import run_steps
    from tasks.engine import execute_plainly

    soul_dir, run_dir, _ = tiny_augment_run
    paths = RunPaths.of(run_dir)
    before = read_report(run_dir)
    paths.report_json.unlink()
    run = run_steps(AUGMENT, run_dir, preset("tiny"), source=soul_dir, execute=execute_plainly)
    assert run.cached == [step.name for step in AUGMENT]
    after = read_report(run_dir)
    assert set(after) == set(before) and after["pix2pix"] == before["pix2pix"] and after["synthetic"] == before["synthetic"]
    assert "## Pix2Pix" in paths.report_md.read_text()

    scores = paths.scores_csv.read_bytes()
    paths.scores_csv.unlink()
    run = run_steps(AUGMENT, run_dir, preset("tiny"), source=soul_dir, execute=execute_plainly)
    ran = [name for name in run.outcomes if name not in run.cached]
    assert ran[0] == "score" and paths.scores_csv.read_bytes() == scores  # the same scores, recomputed
    assert set(ran) <= {"score", "export", "figures", "image_quality", "usefulness"}, ran
