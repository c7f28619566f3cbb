"""Frangi's tuning stays a small part of evaluation at 256 px (issue 12): a seeded sample sized by a pixel
budget, vesselness per image through a process pool, and neither changes what it computes."""
from __future__ import annotations

import numpy as np

from brvo_models.segmentation_baselines import FrangiBaseline, tuning_sample_size, vesselness
from conftest import write_blob_dataset
from storage.paired_format import read_arrays
from tasks.shared.workers import process_map


def _images(tmp_path, size: int, n_patients: int = 12):
    images, labels = read_arrays(write_blob_dataset(tmp_path / "soul.h5", n_patients=n_patients, image_size=size))
    return images, labels


def test_the_tuning_sample_follows_a_pixel_budget():
    assert tuning_sample_size(32) == tuning_sample_size(64) == 200  # as before at the demo's sizes
    assert tuning_sample_size(128) == 50
    assert tuning_sample_size(256) == tuning_sample_size(1024) == 32  # never fewer
    assert tuning_sample_size(256, max_images=10, min_images=5) == 10


def test_parallel_vesselness_and_tuning_equal_the_serial_ones(tmp_path):
    images, labels = _images(tmp_path, 32)
    with process_map(2) as parallel_map:
        assert np.array_equal(vesselness(images, (0.5, 1.0), parallel_map), vesselness(images, (0.5, 1.0)))
        parallel = FrangiBaseline.tune(images, labels, seed=3, map_fn=parallel_map)
    assert parallel == FrangiBaseline.tune(images, labels, seed=3)
    assert parallel.n_tuned == min(len(images), 200) and 0 < parallel.tuned_dice <= 1


def test_tuning_at_256_px_uses_a_seeded_sample(tmp_path, monkeypatch):
    import brvo_models.segmentation_baselines as sb

    monkeypatch.setattr(sb, "SIGMA_SETS_64", ((0.5,),))  # one scale: the sample, not the grid, is tested here
    images, labels = _images(tmp_path, 256, n_patients=6)
    assert len(images) > 32
    a = FrangiBaseline.tune(images[:40], labels[:40], seed=1, max_images=8)
    assert a.n_tuned == 8 and a == FrangiBaseline.tune(images[:40], labels[:40], seed=1, max_images=8)
    assert FrangiBaseline.tune(images, labels, seed=1).n_tuned == 32
