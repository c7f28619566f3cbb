"""One way to configure: a preset plus a partial overlay gives the same config at every entry point."""
from __future__ import annotations

import json

import pytest

from tasks.config import config_from

#: A partial overlay: top-level and nested fields, as a user writes one.
OVERLAY = {"seed": 3, "samples_per_missing": 3, "crgan": {"epochs": 2}, "input_sanity": {"min_grey_range": 5}}


@pytest.fixture
def expected():
    config = config_from("tiny", OVERLAY)
    assert config.seed == 3 and config.crgan.epochs == 2 and config.input_sanity.min_grey_range == 5
    assert config.pix2pix == config_from("tiny").pix2pix  # the preset's fields the overlay leaves alone
    return config


def test_the_cli_lays_a_config_file_over_the_preset(tmp_path, expected):
    from flows.cli import build_parser, resolve_config

    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps(OVERLAY))
    for argv in (["preprocess", str(tmp_path / "run")], ["prepare", str(tmp_path), str(tmp_path / "run")],
                 ["run", str(tmp_path), str(tmp_path / "run")], ["train-crgan", str(tmp_path / "run")]):
        args = build_parser().parse_args(argv + ["--preset", "tiny", "--config", str(overlay)])
        assert resolve_config(args, tmp_path / "run") == expected, argv[0]


def test_the_augment_flow_lays_config_json_over_its_preset(monkeypatch, expected):
    """config_json used to be a whole config that ignored ``preset``: a partial one fell back to the defaults."""
    import flows.augment

    seen = []

    def capture(soul_dir, run_dir, config, **kwargs):
        seen.append(config)
        return {"bars": {}, "warnings": [], "report": "report.md"}

    monkeypatch.setattr(flows.augment, "augment_chain", capture)
    flows.augment.augment.fn(soul_dir="soul", run_dir="run", preset="tiny", config_json=json.dumps(OVERLAY))
    assert seen == [expected]
    flows.augment.augment.fn(soul_dir="soul", run_dir="run", preset="tiny", config_json=expected.to_json())
    assert seen[-1] == expected  # a whole config is an overlay of every field


def test_the_retrain_flow_lays_config_json_over_its_preset(monkeypatch, expected):
    import flows.retrain

    seen = []

    def capture(soul_dir, registry_dir, config, *args):
        seen.append(config)
        return {"status": "no change", "message": "no change"}

    monkeypatch.setattr(flows.retrain, "retrain_chain", capture)
    flows.retrain.retrain.fn(soul_dir="soul", registry_dir="reg", preset="tiny", config_json=json.dumps(OVERLAY))
    assert seen == [expected]


def test_the_prepare_flow_lays_config_json_over_its_preset(monkeypatch, expected):
    """prepare used PipelineConfig() (named 'demo' but not the demo preset's values) without a config_json."""
    import flows.prepare

    seen = []

    class NoRun:
        results: dict = {}

    def capture(plan, run_dir, config, **kwargs):
        seen.append(config)
        return NoRun()

    monkeypatch.setattr(flows.prepare, "run_steps", capture)
    flows.prepare.prepare.fn(soul_dir="soul", run_dir="run", preset="tiny", config_json=json.dumps(OVERLAY))
    flows.prepare.prepare.fn(soul_dir="soul", run_dir="run")
    assert seen == [expected, config_from("demo")]


def test_a_bad_overlay_is_one_line_at_every_entry_point():
    from storage.errors import BrvoError

    for overlay, words in (("{", "not valid JSON"), ("[1]", "JSON object"), ('{"crgan": {"epochs": 0}}', "crgan.epochs")):
        with pytest.raises(BrvoError, match=words):
            config_from("tiny", overlay)
