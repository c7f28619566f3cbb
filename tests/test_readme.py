"""The README's code examples run verbatim against a real (tiny) run directory."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def readme_snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README snippet {name!r} not found"
    return match.group(1)


@pytest.mark.parametrize("name", ["read-soul", "read-augmented", "train-segmenter"])
def test_readme_snippet_runs(name, tiny_augment_run, tmp_path, monkeypatch):
    _, run_dir, _ = tiny_augment_run
    (tmp_path / "demo_run").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    import torch

    torch.manual_seed(0)  # the snippet's shuffling and initial weights: the same run every time
    exec(compile(readme_snippet(name), f"README:{name}", "exec"), namespace)
    if name == "read-soul":
        assert len(namespace["images"]) == len(namespace["labels"]) > 0
        assert set(namespace["meta"]["split"]) <= {"train", "val", "test"}
    if name == "read-augmented":
        meta, keep = namespace["meta"], namespace["keep"]
        assert (~meta["is_synthetic"]).sum() > 0 and meta["is_synthetic"].sum() > 0
        assert keep[~meta["is_synthetic"].to_numpy()].all()  # every real row is kept
        dropped = meta[~keep]
        assert dropped["is_synthetic"].all() and not dropped["accepted"].any()  # only rejected synthetic rows go
        assert namespace["images"].shape[0] == namespace["labels"].shape[0] == keep.sum()
    if name == "train-segmenter":
        _assert_the_snippet_learned(namespace)


def _assert_the_snippet_learned(namespace: dict) -> None:
    """The README's training loop must improve on the same network untrained (its loss on the rows)."""
    import torch
    from torch.utils.data import DataLoader

    trained, train = namespace["net"], namespace["train"]
    torch.manual_seed(0)
    untrained = type(trained)(input_nc=1, output_nc=1, num_downs=namespace["size"].bit_length() - 1, ngf=8)

    def mean_loss(net) -> float:
        net.eval()
        total = n = 0
        with torch.no_grad():
            for image, label, _ in DataLoader(train, batch_size=64):
                prob = ((net(image * 2 - 1) + 1) / 2).clamp(1e-5, 1 - 1e-5)
                total += torch.nn.functional.binary_cross_entropy(prob, label, reduction="sum").item()
                n += label.numel()
        return total / n

    assert mean_loss(trained) < 0.95 * mean_loss(untrained)  # untrained: ~0.69 (p = 0.5 everywhere)
