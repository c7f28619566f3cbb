"""Shared fixtures. One Prefect test harness per session (it starts a temporary server, ~15 s).

`make test` runs the suite on pytest-xdist workers (one process per CPU, each its own session): the
set-up below keeps them from sharing Prefect's database or oversubscribing the cores.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Before Prefect or torch is imported (conftest loads before any test module), so that both, and every
# command a test starts in a subprocess, see these.
# A Prefect home per session: the console-script tests start temporary servers whose SQLite database
# lives in PREFECT_HOME, and two workers must not migrate and write ~/.prefect/prefect.db at once.
_PREFECT_HOME = tempfile.mkdtemp(prefix="brvo-tests-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
# Each worker's share of the cores: torch's default (one thread per core) in every worker oversubscribes them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

from storage.paired_format import PairedDatasetWriter, STAGE_NAMES  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Use in tests that run flows: a temporary Prefect server for the whole session."""
    results = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is scripts, not a package), registered in sys.modules under
    NAME: a benchmark's dataclasses look their module up while the class is built."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def wrongly_labelled_copies(real, copies: int = 3):
    """``copies`` 'synthetic' copies of each real row (usefulness_protocol.Rows) whose labels belong to other
    images, shifted 3 px (label noise): rows that must make a segmenter worse."""
    from tasks.analyses.usefulness_protocol import Rows

    rng = np.random.default_rng(0)
    wrong = np.roll(np.repeat(real.labels[rng.permutation(len(real))], copies, 0), 3, axis=2)
    n = copies * len(real)
    return Rows(np.repeat(real.images, copies, 0), wrong, np.repeat(real.patient_id, copies),
                np.repeat(real.stage, copies), np.ones(n, bool), np.ones(n, bool))


def write_blob_dataset(path: Path, n_patients: int = 8, image_size: int = 32, seed: int = 0,
                       missing_prob: float = 0.3) -> Path:
    """A small, structured 'brvo-paired' file: per-patient blobs that fade with stage, labels = thick lines.

    Good enough to exercise training loops and shapes before the phantom exists; not for quality bars.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    splits = ["train"] * max(1, n_patients - 4) + ["val", "val", "test", "test"]
    with PairedDatasetWriter(path, image_size, attrs={"description": "test blobs"}) as w:
        for p in range(n_patients):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            for stage in range(6):
                if stage > 0 and rng.random() < missing_prob:
                    continue
                for e in range(int(rng.integers(1, 3))):
                    label = ((np.abs(np.sin((xx + yy * (1 + p % 3)) * 12)) < 0.25)).astype(np.uint8)
                    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.01 * stage))
                    img = 0.5 * label + 0.4 * blob + 0.05 * rng.standard_normal(label.shape)
                    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
                    w.append(img[None], label[None], {
                        "patient_id": [f"{p + 1:03d}"], "stage": [stage], "exam_id": [f"{p}{stage}{e}"],
                        "subset": [STAGE_NAMES[stage]], "split": [splits[p % len(splits)]],
                        "is_synthetic": [False], "label_source": ["annotation"],
                    })
    return path


@pytest.fixture
def blob_h5(tmp_path) -> Path:
    return write_blob_dataset(tmp_path / "soul.h5")


TINY_PATIENTS = 8


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """An 8-patient phantom in the SOUL layout, shared by the session."""
    from flows.phantom import PhantomConfig, generate_phantom

    root = tmp_path_factory.mktemp("phantom") / "SOUL"
    generate_phantom(root, PhantomConfig(n_patients=TINY_PATIENTS, seed=0))
    return root


@pytest.fixture(scope="session")
def tiny_augment_run(prefect_harness, tiny_phantom, tmp_path_factory):
    """The whole augment flow once on the tiny phantom with the 'tiny' preset: (soul_dir, run_dir, result)."""
    from flows.augment import augment

    run_dir = tmp_path_factory.mktemp("runs") / "demo_run"
    result = augment(soul_dir=str(tiny_phantom), run_dir=str(run_dir), preset="tiny")
    return tiny_phantom, run_dir, result
