"""The full preset (256 px, the reference widths and schedule kind) end to end, the way researchers run it:
`brvo-augment run SOUL RUN --preset full`, with the schedule cut to one epoch through --config and a small
phantom. Here on the CPU it proves the 256 px code path without a GPU; tests/test_gpu.py runs it on CUDA.

Marked ``gpu`` (deselected by default): even cut to one epoch, the reference widths at 256 px take about
5 minutes of a 2-core CPU (measured: 320 s of flow, Pix2Pix 100 s, CRGAN 174 s), too long for CI. Run it with
`pytest -m gpu tests/test_full_preset.py`."""
from __future__ import annotations

import json

import pytest

from brvo_models.segmentation_baselines import tuning_sample_size
from flows.cli import main
from storage.checkpoints import load_checkpoint
from storage.paired_format import read_meta, validate
from storage.run_dir import RunPaths, read_report

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

#: One epoch each, one sample per hole, two usefulness steps: only the schedule and the counts shrink.
SHORT = {"pix2pix": {"epochs": 1}, "crgan": {"epochs": 1}, "samples_per_missing": 1, "segmenter_steps": 5,
         "usefulness": {"seeds": 1, "segmenter": {"steps": 2, "validations": 1}, "forecaster": {"steps": 2}}}


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    """5 patients (3 train, 1 val, 1 test), one scan per visit, holes to fill: the least the full path needs."""
    from flows.phantom import PhantomConfig, generate_phantom

    root = tmp_path_factory.mktemp("full-phantom") / "SOUL"
    generate_phantom(root, PhantomConfig(n_patients=5, seed=1, images_per_visit=(1, 1),
                                         attendance=(1.0, 0.8, 0.8, 0.6, 0.6, 0.4)))
    return root


def run_full_preset(soul, run_dir, tmp_path, overrides: dict | None = None) -> dict:
    config = tmp_path / "short.json"
    config.write_text(json.dumps({**SHORT, **(overrides or {})}))
    assert main(["run", str(soul), str(run_dir), "--preset", "full", "--config", str(config)]) == 0
    return read_report(run_dir)


def check_full_run(run_dir, report: dict) -> None:
    """What a finished full-preset run holds: 256 px reference-width models and every output."""
    paths = RunPaths.of(run_dir)
    assert report["config"]["preset"] == "full" and report["config"]["image_size"] == 256
    for model, widths in (("pix2pix", {"ngf": 64, "ndf": 64, "batch_size": 8}), ("crgan", {"ngf": 64, "ndf": 64,
                                                                                            "batch_size": 16})):
        meta = load_checkpoint(paths.checkpoints(model) / "best.pt")
        described = json.loads(meta["config_json"])
        assert described["image_size"] == 256 and described["config"]["schedule"] == "fixed"
        assert {k: described["config"][k] for k in widths} == widths
    assert validate(paths.augmented_h5, deep=True).n_synthetic > 0
    meta = read_meta(paths.augmented_h5)
    assert meta["is_synthetic"].any() and (~meta["is_synthetic"]).any()
    for section in ("pix2pix", "crgan", "synthetic", "usefulness", "timings_s"):
        assert section in report, section
    assert {"otsu", "frangi"} <= set(report["pix2pix"]["baselines"])
    # Frangi is tuned on the 256 px pixel budget's sample (32 images), or on every train/val image when fewer
    training = report["pix2pix"]["training"]
    n_tuned = int(report["pix2pix"]["frangi_params"]["tuned_on"].split()[0])
    assert n_tuned == min(tuning_sample_size(256), training["n_train"] + training["n_val"])
    steps = ("ingest", "preprocess", "pix2pix", "crgan", "fill", "label", "score", "export", "figures", "usefulness",
             "image_quality")
    assert all(report["timings_s"][s] >= 0 for s in steps)


@pytest.mark.usefixtures("prefect_harness")
def test_the_full_preset_finishes_end_to_end_from_the_command_line(small_phantom, tmp_path):
    run_dir = tmp_path / "run"
    report = run_full_preset(small_phantom, run_dir, tmp_path, {"device": "cpu"})
    check_full_run(run_dir, report)
