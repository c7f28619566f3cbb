"""The population course (brvo_models.course_model) and what it does inside CRGAN: it learns a regional change
shared by the training patients and moves a patient's nearest visit to the missing stage with it."""
from __future__ import annotations

import numpy as np
import torch

from brvo_models.course_model import PopulationCourse, fit_population_course, lowpass
from brvo_models.crgan import CRGAN, load_generator
from brvo_models.crgan_data import PatientSequence
from brvo_models.identity import CheckpointIdentity
from storage.checkpoints import save_checkpoint
from tasks.config import preset

SIZE = 32


def _patient(rng: np.random.Generator, stages, rate: float = 0.15) -> dict[int, np.ndarray]:
    """A retina with a dark disc whose signal recovers by ``rate`` of the gap per stage (plus noise)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(10, 22, 2)
    disc = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0 ** 2)))
    out = {}
    for s in stages:
        depth = max(0.0, 0.8 - rate * s)
        img = 0.6 * (1 - depth * disc) + rng.normal(0, 0.03, (SIZE, SIZE))
        out[s] = np.clip(img, 0, 1).astype(np.float32)
    return out


def _lp_change(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = (lowpass(torch.as_tensor(x)[None, None]).numpy() for x in (a, b))
    return float((lb - la).mean())


def test_the_fitted_course_carries_a_shared_regional_change_to_a_new_patient():
    rng = np.random.default_rng(0)
    train = [_patient(rng, [0, 1, 2, 3, 4]) for _ in range(8)]
    model, summary = fit_population_course(train, seed=0, steps=800)
    assert summary["fitted"] and summary["pairs"] == 8 * 20
    new = _patient(rng, [1, 4])  # a patient never seen, observed at stage 1; the truth of stage 4
    moved = model.project(torch.as_tensor(new[1])[None, None], torch.tensor([1]), torch.tensor([4]))[0, 0].numpy()
    true_change = _lp_change(new[1], new[4])
    carried = _lp_change(new[1], moved) / true_change
    assert true_change > 0 and 0.6 < carried < 1.4, carried
    # the same stage is the identity, and an earlier target goes the other way
    same = model.project(torch.as_tensor(new[1])[None, None], torch.tensor([1]), torch.tensor([1]))[0, 0].numpy()
    assert np.array_equal(same, new[1])
    back = model.project(torch.as_tensor(new[4])[None, None], torch.tensor([4]), torch.tensor([1]))[0, 0].numpy()
    assert _lp_change(new[4], back) < 0


def test_without_two_observed_stages_the_course_is_the_identity():
    rng = np.random.default_rng(1)
    model, summary = fit_population_course([_patient(rng, [2]) for _ in range(3)])
    assert summary == {"pairs": 0, "pixels": 0, "loss": None, "fitted": False}
    x = torch.rand(2, 1, SIZE, SIZE)
    assert torch.equal(model.project(x, torch.tensor([0, 1]), torch.tensor([5, 3])), x)


def _sequences(rng: np.random.Generator) -> list[PatientSequence]:
    seqs = []
    for i in range(6):
        stages = _patient(rng, [0, 2, 3, 5])
        images = [None] * 6
        for s, img in stages.items():
            images[s] = np.stack([np.clip(img * 255 + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
                                  for _ in range(2)])
        seqs.append(PatientSequence(str(i), "train", images, index=i))
    return seqs


def test_crgan_fits_the_course_on_its_training_patients_freezes_it_and_the_checkpoint_restores_it(tmp_path):
    seqs = _sequences(np.random.default_rng(2))
    cfg = preset("tiny").crgan.model_copy(update={"population_course": True})
    model = CRGAN(cfg, SIZE, [s.patient_id for s in seqs], train_seqs=seqs, seed=0)
    assert model.course_summary["fitted"] and model.course_summary["pairs"] == 6 * 12
    course = model.generator.course
    assert all(not p.requires_grad for p in course.parameters())
    before = {k: v.clone() for k, v in course.state_dict().items()}
    batch = __import__("brvo_models.crgan_data", fromlist=["make_train_batches"]).make_train_batches(seqs, cfg, 0, 0)[0]
    model.train_step(batch)
    assert all(torch.equal(before[k], v) for k, v in course.state_dict().items())  # training leaves it alone
    # a refit with the same data and seed is the same model (the run is reproducible)
    again = CRGAN(cfg, SIZE, [s.patient_id for s in seqs], train_seqs=seqs, seed=0)
    assert all(torch.equal(before[k], v) for k, v in again.generator.course.state_dict().items())
    # the checkpoint holds it: load_generator (weights_only) rebuilds a generator with the same course
    identity = CheckpointIdentity("crgan", cfg, SIZE, 0, {"patient_ids": model.patient_ids})
    path = tmp_path / "g.pt"
    save_checkpoint(path, {"meta": {**identity.meta}, "config_json": identity.config_json,
                           "modules": {"generator": model.generator.state_dict()}})
    loaded, _, _ = load_generator(path, "cpu", SIZE)
    assert all(torch.equal(before[k], v) for k, v in loaded.course.state_dict().items())


def test_the_course_moves_the_estimate_of_a_later_missing_stage():
    seqs = _sequences(np.random.default_rng(3))
    seq = seqs[0]
    context = torch.zeros(1, 6, 1, SIZE, SIZE)
    visible = torch.zeros(1, 6, dtype=torch.bool)
    for s in (0, 2):
        context[0, s, 0] = torch.tensor(seq.stage_mean(s)) * 2 - 1
        visible[0, s] = True
    outs = {}
    for on in (False, True):  # the same initial weights, with and without the course
        cfg = preset("tiny").crgan.model_copy(update={"population_course": on, "texture": False})
        torch.manual_seed(0)
        g = CRGAN(cfg, SIZE, [s.patient_id for s in seqs], train_seqs=seqs, seed=0).generator.eval()
        with torch.no_grad():
            outs[on] = g(context, visible, torch.tensor([0]), torch.zeros(1, cfg.z_dim),
                         torch.zeros(1, 2, SIZE, SIZE), torch.tensor([0]), torch.tensor([5]))[0, 0]
    # stage 5, after the last visit (2): the dark disc has recovered more than the copy of stage 2 says
    disc = seq.stage_mean(0) < seq.stage_mean(0).mean() - 0.1
    gain = ((outs[True] - outs[False]) / 2).numpy()
    assert gain[disc].mean() > 0.02 and gain[disc].mean() > 2 * abs(gain[~disc].mean())



def test_course_anchor_gives_the_estimate_the_moved_references_low_pass_whatever_the_decoder_does():
    """With course_anchor the regional level of the estimate is the population course's: a decoder that tries to
    darken the whole image (here: a head bias) cannot undo the course, while the detail (high-pass) stays its
    own."""
    from brvo_models.crgan import CRGANGenerator
    from brvo_models.crgan_data import pixel_noise

    cfg = preset("tiny").crgan.model_copy(update={"population_course": True, "texture": False})
    g = torch.Generator().manual_seed(0)
    context = torch.rand(1, 6, 1, SIZE, SIZE, generator=g) * 0.8 - 0.6  # [0.2, 0.6] on [0, 1]: no clipping
    visible = torch.tensor([[False, True, False, True, False, False]])
    sel_b, sel_t = torch.zeros(3, dtype=torch.long), torch.tensor([2, 4, 5])  # interior, after the last (x2)
    args = (context, visible, torch.tensor([0]), torch.zeros(1, cfg.z_dim), pixel_noise(3, SIZE, g), sel_b, sel_t)
    torch.manual_seed(0)
    plain = CRGANGenerator(cfg, SIZE, 2).eval()
    anchored = CRGANGenerator(cfg.model_copy(update={"course_anchor": True}), SIZE, 2).eval()
    with torch.no_grad():
        for gen in (plain, anchored):
            gen.course.net[-1].bias.fill_(0.2)  # a course that brightens every region by exp(0.2)
        anchored.load_state_dict(plain.state_dict())
        for gen in (plain, anchored):
            gen.head.bias.fill_(-0.4)
        out_plain, out_anchor = plain(*args), anchored(*args)
        moved = plain.course.project((context[0, [1, 3]] + 1) / 2, torch.tensor([1, 3]), torch.tensor([2, 2]))
    expected = [0.5 * (moved[0] + moved[1]),  # stage 2 sits halfway between the visits 1 and 3
                plain.course.project((context[0, [3]] + 1) / 2, torch.tensor([3]), torch.tensor([4]))[0],
                plain.course.project((context[0, [3]] + 1) / 2, torch.tensor([3]), torch.tensor([5]))[0]]
    for i, want in enumerate(expected):
        lp_want = lowpass(want[None]).squeeze()
        lp_anchor = lowpass(((out_anchor[i] + 1) / 2)[None]).squeeze()
        lp_plain = lowpass(((out_plain[i] + 1) / 2)[None]).squeeze()
        err_anchor = float((lp_anchor - lp_want).abs().mean())
        assert err_anchor < 0.02, (i, err_anchor)
        assert float((lp_plain - lp_want).abs().mean()) > 3 * err_anchor
    # the detail (high-pass) is the decoder's, the same with and without the anchor
    hp = lambda x: x - lowpass(x)
    assert float((hp((out_anchor + 1) / 2) - hp((out_plain + 1) / 2)).abs().mean()) < 0.01
