"""Cache keys follow file contents (not path strings), so reruns skip only truly finished work."""
from tasks.caching import content_cache_key, outputs_exist
from tasks.config import preset


def test_key_changes_with_content_not_with_rewrite(tmp_path):
    f = tmp_path / "manifest.csv"
    f.write_text("a,b\n1,2\n")
    key = content_cache_key("step", ["path"])
    k1 = key(None, {"path": str(f), "config": preset("tiny")})
    f.write_text("a,b\n1,2\n")  # same bytes, new mtime
    assert key(None, {"path": str(f), "config": preset("tiny")}) == k1
    f.write_text("a,b\n1,3\n")
    assert key(None, {"path": str(f), "config": preset("tiny")}) != k1


def test_key_follows_config_and_ignores_callbacks(tmp_path):
    key = content_cache_key("step", [], lambda p: [tmp_path / "derived.bin"])
    base = {"run_dir": str(tmp_path), "config": preset("tiny"), "log": print}
    k1 = key(None, base)
    assert key(None, {**base, "log": lambda m: None}) == k1
    assert key(None, {**base, "config": preset("tiny").with_overrides(seed=5)}) != k1
    (tmp_path / "derived.bin").write_bytes(b"x")
    assert key(None, base) != k1


def test_outputs_exist(tmp_path):
    assert not outputs_exist([tmp_path / "nope"])
    (tmp_path / "yes").write_text("1")
    assert outputs_exist([tmp_path / "yes"])
