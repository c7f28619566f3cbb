"""Who is seen at which stage, how many scans each visit gets, and their exam ids (pure, no images).

Why apart from the images: the plan is what makes a phantom look like one clinic's
follow-up (SOUL's patients fall off over the six stages, and a visit has 1-8 repeat
scans); it is cheap, testable on its own and decides the folder layout before any
pixel is rendered.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brvo_models.phantom.anatomy import sample_params
from brvo_models.phantom.config import SOUL_ATTENDANCE, PhantomConfig
from brvo_models.phantom.soul_layout import MAX_EXAMS, PAPER_IMAGES, PAPER_PATIENTS

_PLAN_TAG = 0x50_1A  # separates the attendance stream from the per-patient streams
FIRST_EXAM_ID = 10001


def stage_patient_counts(n_patients: int, attendance: tuple[float, ...] = SOUL_ATTENDANCE) -> tuple[int, ...]:
    """Patients per stage: each stage's share of ``n_patients``, rounded (>= 1 each when N >= 3)."""
    floor = 1 if n_patients >= 3 else 0
    return tuple(int(min(n_patients, max(floor, round(share * n_patients)))) for share in attendance)


def reperfusion_rates(config: PhantomConfig) -> np.ndarray:
    """Each patient's reperfusion rate, as their anatomy draws it (the first draws of ``(seed, patient)``)."""
    return np.array([sample_params(np.random.default_rng([config.seed, p]), config.non_perfusion_size).rate
                     for p in range(config.n_patients)])


def _response_rank(rates: np.ndarray) -> np.ndarray:
    """Each patient's place among the cohort by response, in (0, 1): the poorest responder lowest."""
    order = np.argsort(np.argsort(rates, kind="stable"), kind="stable")
    return (order + 0.5) / len(rates)


def plan_attendance(n_patients: int, seed: int, attendance: tuple[float, ...] = SOUL_ATTENDANCE,
                    response: np.ndarray | None = None, follows_response: float = 0.0) -> np.ndarray:
    """Bool (n_patients, 6): who attends which stage.

    Each patient has a latent 'retention'; a stage takes its quota of patients with the
    highest retention plus stage-specific jitter, so later stages are mostly, not
    strictly, nested (SOUL's s2t1 has more patients than s1t2). Then every patient
    gets at least one stage and the most retained patient gets all six, by swaps that
    keep the per-stage counts.

    Course-dependent attendance: with ``follows_response`` w > 0 the retention is
    (1 - w) x chance + w x the patient's rank by ``response`` (higher = better), so poor
    responders stop coming first, as in real follow-up; the quotas, hence the stage
    shares, do not change. w = 0 draws and decides exactly as before.
    """
    counts = stage_patient_counts(n_patients, attendance)
    rng = np.random.default_rng([seed, _PLAN_TAG, n_patients])
    retention = rng.random(n_patients)
    if follows_response > 0:
        if response is None or len(response) != n_patients:
            raise ValueError(f"course-dependent attendance needs one response per patient ({n_patients})")
        retention = (1.0 - follows_response) * retention + follows_response * _response_rank(np.asarray(response))
    score = retention[:, None] + 0.25 * rng.random((n_patients, 6))
    att = np.zeros((n_patients, 6), dtype=bool)
    for s, c in enumerate(counts):
        att[np.argsort(-score[:, s], kind="stable")[:c], s] = True

    best = int(np.argmax(retention))

    def swap_in(p: int, s: int) -> None:
        """Give p stage s, taking it from the least retained attendee who keeps another stage."""
        donors = [q for q in np.argsort(score[:, s], kind="stable")
                  if att[q, s] and q != p and att[q].sum() > 1 and q != best]
        if donors:
            att[donors[0], s] = False
        att[p, s] = True

    if min(counts) >= 1:
        for s in range(6):
            if not att[best, s]:
                swap_in(best, s)
    for p in range(n_patients):
        if not att[p].any():
            swap_in(p, int(np.argmax(score[p])))
    return att


def plan_exam_counts(attendance: np.ndarray, seed: int, images_per_visit: tuple[int, int] = (1, MAX_EXAMS)
                     ) -> np.ndarray:
    """Int (n_patients, 6): repeat scans per attended visit, in ``images_per_visit`` (lo..hi).

    lo + Binomial(hi - lo, p_stage): p_stage puts SOUL's per-stage mean scan count in SOUL's
    1..8 range, so 1..8 gives SOUL's means and any narrower range keeps the stages' order.
    """
    n = attendance.shape[0]
    lo, hi = images_per_visit
    rng = np.random.default_rng([seed, _PLAN_TAG, n, 1])
    mean = np.minimum(np.array(PAPER_IMAGES) / np.array(PAPER_PATIENTS), MAX_EXAMS - 0.5)
    p = (mean - 1) / (MAX_EXAMS - 1)
    counts = lo + rng.binomial(hi - lo, np.broadcast_to(p, (n, 6)))
    return np.where(attendance, counts, 0)


@dataclass(frozen=True)
class VisitPlan:
    """The whole follow-up of a phantom: attendance, scans per visit and each scan's exam id."""
    attendance: np.ndarray                         # bool (n_patients, 6)
    exam_counts: np.ndarray                        # int (n_patients, 6), 0 where not attended
    exam_ids: tuple[tuple[tuple[str, ...], ...], ...]  # [patient][stage] -> exam ids, () where not attended

    @property
    def n_images(self) -> int:
        return int(self.exam_counts.sum())


def plan_visits(config: PhantomConfig) -> VisitPlan:
    """Attendance, scan counts and exam ids for ``config``; exam ids grow with time (stage-major, then patient)."""
    n = config.n_patients
    follows = config.attendance_follows_response
    attendance = plan_attendance(n, config.seed, config.attendance,
                                 reperfusion_rates(config) if follows > 0 else None, follows)
    counts = plan_exam_counts(attendance, config.seed, config.images_per_visit)
    ids: list[list[tuple[str, ...]]] = [[() for _ in range(6)] for _ in range(n)]
    next_id = FIRST_EXAM_ID
    for s in range(6):
        for p in range(n):
            ids[p][s] = tuple(str(next_id + k) for k in range(counts[p, s]))
            next_id += counts[p, s]
    return VisitPlan(attendance, counts, tuple(tuple(stages) for stages in ids))
