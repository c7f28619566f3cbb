"""The CLI turns expected problems into one line on stderr and exit code 2, never a traceback."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from flows.cli import main


def _run_main(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_ingest_missing_root_is_one_line_exit_2(tmp_path, capsys):
    code, err = _run_main(capsys, "ingest", str(tmp_path / "nope"), str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_ingest_root_without_soul_structure(tmp_path, capsys):
    (tmp_path / "soul").mkdir()
    (tmp_path / "soul" / "notes.txt").write_text("hello")
    code, err = _run_main(capsys, "ingest", str(tmp_path / "soul"), str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: ")


def test_inspect_rejects_non_dataset(tmp_path, capsys):
    bad = tmp_path / "x.h5"
    with h5py.File(bad, "w") as f:
        f["images"] = np.zeros((1, 4, 4), np.uint8)
    code, err = _run_main(capsys, "inspect", str(bad))
    assert code == 2 and "format" in err


def test_train_commands_without_soul_h5(tmp_path, capsys):
    for cmd in ("train-pix2pix", "train-crgan", "preprocess"):
        code, err = _run_main(capsys, cmd, str(tmp_path / "empty_run"), "--preset", "tiny")
        assert code == 2, cmd
        assert err.startswith("error: ") and err.count("\n") == 1, (cmd, err)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(tmp_path / "missing"),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")



def test_prepare_command_runs_the_flow_and_writes_a_valid_soul_h5(tiny_phantom, tmp_path):
    """The real console script (its own temporary Prefect server), as a user types it."""
    from storage.paired_format import validate

    proc = subprocess.run([sys.executable, "-m", "flows.cli", "prepare", str(tiny_phantom), str(tmp_path / "run"),
                           "--preset", "tiny"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = validate(tmp_path / "run" / "soul.h5")
    assert summary.image_size == 32 and summary.n_real > 0


def test_config_file_that_is_not_a_json_object_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("[1, 2]")
    code, err = _run_main(capsys, "preprocess", str(tmp_path / "run"), "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1
    assert "JSON object of config fields" in err


def test_config_file_with_an_unknown_or_invalid_field_names_it_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    for content, named in (('{"bogus": 1}', "bogus"), ('{"crgan": {"epochs": "many"}}', "crgan.epochs"),
                           ('{"nope": {"x": 1}}', "nope"), ('{"pix2pix": {"lambda_dice": -1}}', "pix2pix.lambda_dice")):
        cfg.write_text(content)
        code, err = _run_main(capsys, "preprocess", str(tmp_path / "run"), "--config", str(cfg))
        assert code == 2 and err.startswith("error: config") and err.count("\n") == 1, err
        assert named in err


# ---------------------------------------------------------------------------- phantom: the knobs on the command line

def test_phantom_bad_values_are_one_line_exit_2(tmp_path):
    """As a user types it: a value out of range, from a flag or from --config, is `error: ...` and exit 2."""
    bad_config = tmp_path / "clinic.json"
    bad_config.write_text('{"n_patients": 24, "vessel_density": 9}')
    for extra, words in ((["--images-per-visit", "0-3"], "images_per_visit"),
                         (["--config", str(bad_config)], "vessel_density")):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "phantom", str(tmp_path / "out"), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["--attendance", "1,0.5"], "attendance"), (["--attendance", "1,1,1,1,1,0"], "attendance"),
    (["--contrast", "2"], "contrast"), (["--noise", "-1"], "noise"), (["--vessel-width", "9"], "vessel_width"),
    (["--non-perfusion-size", "5"], "non_perfusion_size"), (["--patients", "0"], "n_patients"),
    (["--images-per-visit", "2-9"], "images_per_visit"), (["--workers", "0"], "workers"),
])
def test_phantom_flag_out_of_range(tmp_path, capsys, argv, words):
    code, err = _run_main(capsys, "phantom", str(tmp_path / "out"), *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_phantom_options_cover_every_config_field():
    """A knob added to PhantomConfig without a flag fails here (--config alone would hide it from --help)."""
    from brvo_models.phantom.config import PhantomConfig
    from flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    dests = {a.dest for a in sub.choices["phantom"]._actions}
    renamed = {"n_patients": "patients"}
    assert {renamed.get(f, f) for f in PhantomConfig.model_fields} <= dests


@pytest.mark.usefixtures("prefect_harness")
def test_phantom_command_writes_the_configured_dataset(tmp_path, capsys):
    """--config first, then each flag given: the written tree follows both."""
    config = tmp_path / "clinic.json"
    config.write_text('{"n_patients": 3, "image_size": 64, "contrast": 0.4}')
    out = tmp_path / "soul"
    code = main(["phantom", str(out), "--config", str(config), "--patients", "4", "--images-per-visit", "1-2",
                 "--attendance", "1,1,0.5,0.5,0.25,0.25", "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    assert "contrast=0.4" in capsys.readouterr().out
    patients = {p.name for p in out.glob("S*/s*/image/*")}
    assert patients == {"1", "2", "3", "4"}  # the flag's 4, not the file's 3
    visits = list(out.glob("S*/s*/image/*"))
    assert all(1 <= len(list(v.glob("*.jpg"))) <= 2 for v in visits)
    assert [len(list(out.glob(f"S*/{s}/image/*"))) for s in ("s1t1", "s1t2", "s2t1", "s2t2", "s3t1", "s3t2")] == \
           [4, 4, 2, 2, 1, 1]
    from PIL import Image

    assert Image.open(next(out.glob("S1/s1t1/image/*/*.jpg"))).size == (64, 64)


@pytest.mark.parametrize("fields, named", [
    ({"compression": "bogus"}, "compression"),
    ({"device": "tpu"}, "device"),
    ({"samples_per_missing": 0}, "samples_per_missing"),
    ({"samples_per_missing": 1_000_000_000}, "samples_per_missing"),
    ({"image_size": 100000}, "image_size"),
    ({"image_size": 33}, "image_size"),
    ({"val_fraction": 1.5}, "val_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "test_fraction"),
    ({"workers": 0}, "workers"),
    ({"min_label_confidence": 2}, "min_label_confidence"),
    ({"acceptance": "sometimes"}, "acceptance"),
    ({"acceptance_quantile": 0.5}, "acceptance_quantile"),
    ({"crgan": {"batch_size": -3}}, "crgan.batch_size"),
    ({"pix2pix": {"epochs": -1}}, "pix2pix.epochs"),
    ({"max_file_mb": 0}, "max_file_mb"),
])
def test_out_of_range_config_is_refused_before_any_work(tmp_path, capsys, fields, named):
    """Issue 15 #8: a bad value is one line and exit 2 before ingest runs (nothing is written)."""
    import json

    (tmp_path / "soul").mkdir()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(fields))
    code, err = _run_main(capsys, "run", str(tmp_path / "soul"), str(tmp_path / "run"), "--config", str(cfg))
    assert code == 2 and err.startswith("error: config") and err.count("\n") == 1, err
    assert named in err or "val_fraction + test_fraction" in err
    assert not (tmp_path / "run").exists()


def test_a_command_on_a_run_directory_in_use_waits_then_fails_in_one_line(tiny_phantom, tmp_path):
    """Issue 15 #6: every command that writes into a run directory takes its lock, not only `run`."""
    from storage.locking import run_dir_lock

    run = tmp_path / "run"
    with run_dir_lock(run):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(tiny_phantom), str(run)],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "in use by another run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "manifest.csv").exists()


def test_unreachable_prefect_api_is_one_line_before_any_work(tmp_path):
    """Issue 13: with PREFECT_API_URL set and no server there, `phantom` is one line, not a 110-line traceback."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "phantom", str(tmp_path / "ph"), "--patients", "3"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot reach the Prefect API at http://127.0.0.1:") , proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "ph").exists()


def test_a_run_json_from_an_older_version_is_one_line_exit_2(tmp_path, capsys):
    import json

    from tasks.config import preset

    run = tmp_path / "run"
    run.mkdir()
    old = json.loads(preset("demo").to_json())
    old["pix2pix"]["epochs_decay"] = None  # a field this version no longer has
    (run / "run.json").write_text(json.dumps({"config": old}))
    code, err = _run_main(capsys, "train-pix2pix", str(run))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "run.json" in err and "pix2pix.epochs_decay" in err and "Traceback" not in err


def test_require_bars_makes_a_missed_quality_bar_a_nonzero_exit_and_still_writes_everything(
        prefect_harness, tiny_phantom, tmp_path, capsys):
    """`train-pix2pix --require-bars` exits 3 when Pix2Pix loses to a label baseline (one epoch of the tiny preset
    cannot beat Frangi or the supervised segmenter); without the flag the same run exits 0. Report and
    checkpoints are written either way."""
    import json

    from flows.cli import EXIT_BARS_MISSED

    run = tmp_path / "run"
    assert _run_main(capsys, "prepare", str(tiny_phantom), str(run), "--preset", "tiny")[0] == 0
    code, err = _run_main(capsys, "train-pix2pix", str(run), "--preset", "tiny", "--require-bars")
    report = json.loads((run / "report.json").read_text())
    assert report["bars"]["pix2pix_beats_baselines"] is False
    assert set(report["pix2pix"]["baselines"]) == {"otsu", "frangi", "segmenter"}
    assert code == EXIT_BARS_MISSED and "pix2pix_beats_baselines" in err and "report.md" in err
    assert (run / "report.md").exists() and (run / "checkpoints" / "pix2pix" / "best.pt").exists()
    assert _run_main(capsys, "train-pix2pix", str(run), "--preset", "tiny")[0] == 0


# ------------------------------------------------------------------------------ single steps from the step table


def _subcommands() -> set[str]:
    from flows.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def test_the_single_step_commands_come_from_the_step_table():
    from flows.augment import AUGMENT

    declared = {step.command.name for step in AUGMENT if step.command is not None}
    assert declared == {"ingest", "preprocess", "train-pix2pix", "train-crgan"}
    assert declared <= _subcommands()


def test_every_command_a_message_tells_the_user_to_run_exists():
    """'run it first (brvo-augment pix2pix ...)' named a command that does not exist; every hint now names one."""
    import re
    from pathlib import Path

    from flows.augment import AUGMENT

    commands = _subcommands()
    for step in AUGMENT:
        hint = step.how_to_make("RUN")
        assert hint.split()[0] == "brvo-augment" and hint.split()[1] in commands, (step.name, hint)
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("tasks/**/*.py"), *root.glob("flows/*.py"), *root.glob("deployments/*.py")]:
        for named in re.findall(r"[(`]brvo-augment ([a-z0-9-]+)", path.read_text()):
            assert named in commands, f"{path.relative_to(root)} tells users to run 'brvo-augment {named}'"


def test_a_step_run_alone_names_the_command_that_makes_a_missing_upstream_result(tmp_path):
    from flows.augment import AUGMENT
    from storage.errors import BrvoError
    from tasks.config import preset
    from tasks.engine import StepContext, run_plan, single_step_plan

    ctx = StepContext(run_dir=tmp_path, config=preset("tiny"), log=lambda _m: None)
    plan = single_step_plan(AUGMENT, "label", ctx.paths)
    assert [s.name for s in plan] == ["ingest", "preprocess", "pix2pix", "crgan", "fill", "label"]
    with pytest.raises(BrvoError, match=r"no finished 'ingest' step .*run it first \(brvo-augment ingest SOUL_DIR "):
        run_plan(plan, ctx, only={"label"})
    fill = plan[4]
    assert fill.command is None and fill.how_to_make(tmp_path) == f"brvo-augment run SOUL_DIR {tmp_path}"


def test_train_crgan_after_ingest_and_preprocess_needs_no_pix2pix(prefect_harness, tiny_phantom, tmp_path, capsys):
    """As a new user would: ingest, preprocess, then train-crgan, on a fresh run directory. It used to fail
    asking for a 'pix2pix' step that CRGAN does not need, through a command that does not exist."""
    import json

    run = tmp_path / "run"
    assert _run_main(capsys, "ingest", str(tiny_phantom), str(run))[0] == 0
    assert _run_main(capsys, "preprocess", str(run), "--preset", "tiny")[0] == 0
    code, err = _run_main(capsys, "train-crgan", str(run), "--preset", "tiny")
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert "crgan" in report and "pix2pix" not in report
    assert (run / "checkpoints" / "crgan" / "best.pt").exists() and not (run / "checkpoints" / "pix2pix").exists()
