"""The full preset on CUDA, end to end from the command line (issue 12, item 1).

Deselected by default (pyproject's addopts `-m 'not gpu'`, so CPU CI neither runs nor skips it); on a GPU
machine `pytest -m gpu` runs it (benchmarks/gpu_device_run.sh does). There, `brvo-augment run SOUL RUN --preset
full` runs at 256 px with the reference widths on a small phantom, its schedules cut to one epoch, with
``device: cuda`` so no step can fall back to the CPU (select_device refuses 'cuda' without a GPU): the output
must validate deeply and the trained checkpoints must load and label on the GPU. A run of `pytest -m gpu` on a
machine without CUDA skips it with the reason.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_full_preset import check_full_run, run_full_preset, small_phantom  # noqa: F401 (a fixture)

from brvo_models.crgan import load_generator
from brvo_models.pix2pix import label_images, load_labeller
from storage.paired_format import read_arrays
from storage.run_dir import RunPaths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]


@pytest.mark.usefixtures("prefect_harness")
def test_the_full_preset_finishes_end_to_end_on_cuda(small_phantom, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    report = run_full_preset(small_phantom, run_dir, tmp_path, {"device": "cuda"})
    check_full_run(run_dir, report)
    assert report["config"]["device"] == "cuda"

    paths = RunPaths.of(run_dir)
    generator, device = load_labeller(paths.checkpoints("pix2pix") / "best.pt", "cuda", 256)
    assert device.type == "cuda" and all(p.is_cuda for p in generator.parameters())
    images, _ = read_arrays(paths.soul_h5)
    probabilities, masks = label_images(generator, images[:4], 0.5, batch_size=4, device=device)
    assert masks.shape == (4, 256, 256) and np.isfinite(probabilities).all()

    crgan, _, crgan_device = load_generator(paths.crgan_checkpoint, "cuda", 256)
    assert crgan_device.type == "cuda" and all(p.is_cuda for p in crgan.parameters())
