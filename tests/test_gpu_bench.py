"""benchmarks/gpu_bench.py on the CPU at its --tiny sizes: the figures the GPU session relies on come out
(img/s, FLOPs, the fraction of the matmul peak, a run's per-step timings) and a failing section is recorded
without losing the others."""
from __future__ import annotations

import json

import pytest

import brvo_models.crgan as crgan_module
import brvo_models.pix2pix as pix2pix_module
from conftest import load_benchmark



@pytest.fixture(scope="module")
def gpu_bench():
    return load_benchmark("gpu_bench")


def test_tiny_bench_times_both_training_steps_and_keeps_going_after_a_failed_section(gpu_bench, tmp_path):
    out = tmp_path / "bench.json"
    # 'eval' without --full-run fails; the sections after it must still run and the JSON must say why
    rc = gpu_bench.main(["--tiny", "--device", "cpu", "--batches", "1", "--window", "0.05",
                         "--sections", "peak,eval,pix2pix,crgan,checkpoint", "--json", str(out)])
    assert rc == 1
    results = json.loads(out.read_text())
    assert "--full-run" in results["errors"]["eval"] and set(results["errors"]) == {"eval"}
    assert results["peak"]["tflops"] > 0
    for model in ("pix2pix", "crgan"):  # what a checkpoint write costs (the cost checkpoint_every_s bounds)
        ck = results["checkpoint"][model]
        assert ck["mb"] > 0 and 0 < ck["write_s_min"] <= ck["write_s_max"] and ck["params_m"] > 0
    rows = results["pix2pix"] + results["crgan"]
    assert [(r["model"], r["batch"], r["precision"]) for r in rows] == [("pix2pix", 1, "fp32"), ("crgan", 1, "fp32")]
    for row in rows:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["flops_per_step"] > 0
        assert row["fraction_of_bf16_peak"] == pytest.approx(row["tflops"] / results["peak"]["tflops"])
    assert results["crgan"][0]["images_per_step"] >= 1  # the stage images of one patient's sequence


def test_fp32_swaps_the_models_autocast_only_while_timed(gpu_bench):
    before = pix2pix_module.autocast, crgan_module.autocast
    with gpu_bench.precision("fp32"):
        assert pix2pix_module.autocast is not before[0] and crgan_module.autocast is not before[1]
    assert (pix2pix_module.autocast, crgan_module.autocast) == before


def test_flow_timings_come_from_the_runs_report_and_step_records(gpu_bench, tmp_path):
    (tmp_path / ".steps").mkdir()
    (tmp_path / ".steps" / "pix2pix.json").write_text(json.dumps({"step": "pix2pix", "seconds": 61.5,
                                                                  "finished_utc": "2026-01-01T00:00:00+00:00"}))
    (tmp_path / "report.json").write_text(json.dumps({
        "timings_s": {"ingest": 1.0, "pix2pix": 61.5, "total": 62.5},
        "pix2pix": {"seconds": 9.0, "training": {"seconds": 50.0, "steps": 100, "epochs": 4},
                    "frangi_params": {"seconds": 3.0}}}))
    flow = gpu_bench.flow_timings(tmp_path)
    assert flow["timings_s"]["pix2pix"] == 61.5 and flow["step_records"]["pix2pix"]["seconds"] == 61.5
    assert flow["pix2pix_detail"] == {"train_seconds": 50.0, "steps": 100, "epochs": 4, "eval_seconds": 9.0,
                                      "frangi_seconds": 3.0}
    with pytest.raises(RuntimeError, match="neither report.json"):
        gpu_bench.flow_timings(tmp_path / "missing")


def test_batch_size_check_applies_its_declared_rule_to_seed_pairs():
    check = load_benchmark("batch_size_check")

    def run(variant, seed, dice, seconds=10.0):
        return {"variant": variant, "seed": seed, "test_dice": dice, "train_s": seconds}

    runs = [run("b1", 0, 0.80), run("b1", 1, 0.78), run("b8", 0, 0.79, 3.0), run("b8", 1, 0.77, 3.0),
            run("b8_sqrt_lr", 0, 0.70), run("b8_sqrt_lr", 1, 0.90), run("b8_linear_lr", 0, 0.796)]
    verdicts = check.verdicts(runs)
    # a steady loss of 0.01 on both seeds is far beyond 2 SE of a near-zero spread: batch 8 loses
    assert verdicts["b8"]["paired_dice_diff_mean"] == pytest.approx(-0.01)
    assert not verdicts["b8"]["keeps_batch1_quality"] and verdicts["b8"]["train_s_ratio_to_b1"] == 0.3
    # -0.1 and +0.12: a noisy difference whose mean is within 2 SE of zero does not count as a loss
    assert verdicts["b8_sqrt_lr"]["keeps_batch1_quality"]
    # one seed: the fixed 0.005 tolerance
    assert verdicts["b8_linear_lr"]["seeds"] == [0] and verdicts["b8_linear_lr"]["keeps_batch1_quality"]
    assert not check.verdicts([run("b1", 0, 0.80), run("b8", 0, 0.79)])["b8"]["keeps_batch1_quality"]
    # a variant without its b1 partner on any seed gives no verdict
    assert check.verdicts([run("b1", 0, 0.8), run("b8", 1, 0.9)]) == {}
