"""The CLI turns expected problems into one line on stderr and exit code 2, never a traceback."""
import subprocess
import sys

import h5py
import numpy as np

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
