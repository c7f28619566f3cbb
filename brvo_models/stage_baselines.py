"""The two baselines a generated stage must beat: what a reader could do without a model.

For a stage hidden from a patient's sequence, from the patient's other observed stages
(each as the mean of its real images): 'nearest' copies the nearest observed stage (tie:
the earlier one); 'neighbour_mean' averages the nearest earlier and the nearest later
observed stage (the nearest one where one side is empty). The held-out report scores the
CRGAN and both baselines on the same cases.
"""
from __future__ import annotations

import numpy as np

from brvo_models.crgan_data import PatientSequence


def baseline_predictions(seq: PatientSequence, stage: int) -> dict[str, np.ndarray]:
    """{'nearest': ..., 'neighbour_mean': ...}: float [0, 1] images predicting ``stage`` of ``seq``
    from its other observed stages (see the module docstring); ``stage`` itself is never read."""
    others = [o for o in seq.observed if o != stage]
    nearest = min(others, key=lambda o: (abs(o - stage), o))
    before = [o for o in others if o < stage]
    after = [o for o in others if o > stage]
    if before and after:
        mean = 0.5 * (seq.stage_mean(max(before)) + seq.stage_mean(min(after)))
    else:
        mean = seq.stage_mean(nearest)
    return {"nearest": seq.stage_mean(nearest), "neighbour_mean": mean}

