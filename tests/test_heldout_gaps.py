"""The truth-free check a run reports: held-out observed stages split by gap kind, with the course they carry."""
from __future__ import annotations

import numpy as np

from brvo_models.crgan_data import PatientSequence, heldout_cases
from brvo_models.heldout_gaps import heldout_by_gap

SIZE = 48


def _stage(rng: np.random.Generator, dark: float) -> np.ndarray:
    """A bright mesh with a dark square whose side grows with ``dark`` (a non-perfused region)."""
    img = np.full((SIZE, SIZE), 150.0) + rng.normal(0, 4, (SIZE, SIZE))
    side = int(dark * SIZE)
    img[:side, :side] = 30.0
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def test_cases_are_split_by_gap_kind_and_the_course_is_measured_against_the_real_stage():
    rng = np.random.default_rng(0)
    darkness = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # the dark region shrinks stage by stage
    seqs = [PatientSequence(str(p), "val", [_stage(rng, d) if s in (0, 2, 4) else None
                                            for s, d in enumerate(darkness)]) for p in range(3)]
    cases = heldout_cases(seqs)
    assert len(cases) == 9
    truth = [seq.images[s][0] for seq, s in cases]  # a perfect estimate: the real stage itself
    copy = [seq.images[min((o for o in seq.observed if o != s), key=lambda o: (abs(o - s), o))][0]
            for seq, s in cases]
    scored = {name: [{"ssim": 0.5, "psnr": 20.0}] * len(cases) for name in ("model", "nearest", "neighbour_mean")}
    perfect = heldout_by_gap(cases, truth, scored)
    copied = heldout_by_gap(cases, copy, scored)
    assert {k: v["n"] for k, v in perfect.items()} == {"interior": 3, "after_last": 3, "before_first": 3}
    after = perfect["after_last"]["course"]
    assert after["real_change_mean"] < -5  # stage 4 is less non-perfused than stage 2
    assert abs(after["carried"] - 1) < 1e-9 and abs(after["offset"]) < 1e-9
    assert abs(copied["after_last"]["course"]["carried"]) < 1e-9  # a copy carries none of it
    assert perfect["before_first"]["course"]["real_change_mean"] > 5
