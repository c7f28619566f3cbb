"""The precision switch: 'auto' keeps CPU runs in fp32 (bit-reproducible), 'bf16' autocasts on the CPU too,
and a model config's precision reaches every forward pass of training and validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from brvo_models.configs import CRGANConfig, Pix2PixConfig, SegmenterRecipe
from brvo_models.identity import CheckpointIdentity
from brvo_models.runtime import autocast, precision_scope, resolve_precision
from brvo_models.segmenter import fit_segmenter
from brvo_models.training import Schedule, fit

CPU = torch.device("cpu")


def _dtype_under(ctx) -> torch.dtype:
    layer = torch.nn.Linear(4, 4)
    with ctx:
        return layer(torch.randn(2, 4)).dtype


def test_auto_is_fp32_on_cpu_bf16_on_cuda_and_bf16_autocasts_the_cpu():
    assert resolve_precision(CPU, "auto") == "fp32"
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert _dtype_under(autocast(CPU)) == torch.float32
    assert _dtype_under(autocast(CPU, "fp32")) == torch.float32
    assert _dtype_under(autocast(CPU, "bf16")) == torch.bfloat16
    with precision_scope("bf16"):
        assert _dtype_under(autocast(CPU)) == torch.bfloat16
        assert _dtype_under(autocast(CPU, "fp32")) == torch.float32  # an explicit precision wins
    assert _dtype_under(autocast(CPU)) == torch.float32  # the scope ends
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(CPU, "fp16")


@pytest.mark.parametrize("config_type", [Pix2PixConfig, CRGANConfig, SegmenterRecipe])
def test_configs_carry_a_checked_precision(config_type):
    assert config_type().precision == "auto"
    assert config_type(precision="bf16").precision == "bf16"
    with pytest.raises(ValidationError):
        config_type(precision="fp16")


class DtypeProbe:
    """A Trainable that records the dtype its forward passes compute in (they call autocast(device) as the GANs do)."""

    name = "probe"

    def __init__(self, config):
        self.config, self.device = config, CPU
        self.net = torch.nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01)
        self.seen: list[tuple[str, torch.dtype]] = []

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def train_step(self, batch):
        with autocast(self.device):
            out = self.net(batch)
        self.seen.append(("train", out.dtype))
        loss = out.float().pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def validate(self):
        with autocast(self.device):
            self.seen.append(("validate", self.net(torch.ones(2, 1)).dtype))
        return {"score": 0.0}


@pytest.mark.parametrize("precision, expected", [("auto", torch.float32), ("fp32", torch.float32),
                                                 ("bf16", torch.bfloat16)])
def test_fit_trains_and_validates_under_the_model_configs_precision(tmp_path, precision, expected):
    config = Pix2PixConfig(schedule="fixed", epochs=2, precision=precision)
    model = DtypeProbe(config)
    fit(model, lambda epoch: (torch.randn(4, 1) for _ in range(3)), schedule=Schedule.from_config(config, 3),
        checkpoint_dir=tmp_path, identity=CheckpointIdentity("probe", config, 32, 0), log=lambda _m: None)
    assert {kind for kind, _ in model.seen} == {"train", "validate"}
    assert {dtype for _, dtype in model.seen} == {expected}
    assert _dtype_under(autocast(CPU)) == torch.float32  # nothing leaks past fit


def _pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 16, 16)) < 0.2).astype(np.uint8)
    return np.clip(60 + 120 * labels + rng.normal(0, 20, labels.shape), 0, 255).astype(np.uint8), labels


def test_segmenter_fp32_is_bit_reproducible_and_bf16_trains_in_bf16():
    x, y = _pairs(12, 0)
    kw = dict(image_size=16, steps=6, arch="dilated_bn", width=4, batch_size=4, seed=0, device="cpu")
    a, b = fit_segmenter(x, y, precision="fp32", **kw), fit_segmenter(x, y, **kw)
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k  # the default on the CPU is fp32, bit for bit
    c = fit_segmenter(x, y, precision="bf16", **kw)
    weights = c.net.state_dict()["net.body.0.weight"]
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert not torch.equal(weights, a.net.state_dict()["net.body.0.weight"])  # bf16 arithmetic really ran


def test_native_bf16_is_read_from_the_cpu_flags():
    from brvo_models.hardware import cpu_has_native_bf16

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t: fpu avx512f amx_bf16 amx_tile\n"
    older = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\nbugs\t: avx512_bf16_fake\n"
    assert cpu_has_native_bf16(zen4) and cpu_has_native_bf16(sapphire)
    assert not cpu_has_native_bf16(older) and not cpu_has_native_bf16("")


@pytest.mark.parametrize("native", [True, False])
def test_demo_preset_asks_for_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """The demo trains Pix2Pix, CRGAN, the label-baseline segmenter and the usefulness segmenter in bf16 on a CPU
    with bf16 instructions (and stays 'auto' elsewhere: fp32 on such a CPU, bf16 on CUDA); the tiny preset the
    tests and CI run keeps 'auto', so their CPU runs stay fp32 and bit-reproducible."""
    import tasks.config.presets as presets

    monkeypatch.setattr(presets, "cpu_has_native_bf16", lambda: native)
    demo = presets.preset("demo")
    want = "bf16" if native else "auto"
    assert (demo.pix2pix.precision, demo.crgan.precision, demo.usefulness.segmenter.precision) == (want,) * 3
    tiny = presets.preset("tiny")
    assert (tiny.pix2pix.precision, tiny.crgan.precision, tiny.usefulness.segmenter.precision) == ("auto",) * 3
