"""Image quality at the distribution level: synthetic vs held-out real images, per stage.

Why: the per-sample ``realism`` score is the CRGAN's own discriminator judging its own samples,
which says little about whether the synthetic images as a set look like real ones. This
module gives what GAN users expect, computed offline (nothing downloads): image features from
a fixed extractor, then

- **KID** (kernel inception distance, Binkowski et al. 2018): the squared maximum mean
  discrepancy between the real and the synthetic feature distributions under the polynomial
  kernel k(x, y) = (x.y / d + 1)^3, unbiased estimate, averaged over random subsets of
  ``kid_subset_size`` images per side (torchmetrics' ``KernelInceptionDistance`` with the
  features below as its ``feature`` module). **Lower is better**; 0 means the two sets are
  indistinguishable to the kernel, and being unbiased it can be slightly negative when they are.
  ``kid_std`` is the standard deviation over subsets (the spread of one subset's estimate;
  the mean over many subsets is more precise than that).
- **precision / recall / density / coverage** (Naeem et al. 2020, "Reliable fidelity and
  diversity metrics for generative models"; the ``prdc`` package's definitions). Each real
  image gets a ball of radius = distance to its k-th nearest real neighbour (k = ``nearest_k``).
  *precision*: fraction of synthetic images inside at least one real ball (fidelity, **higher
  is better**, 0..1). *recall*: fraction of real images inside at least one synthetic image's
  k-NN ball (diversity, **higher is better**, 0..1). *density*: mean number of real balls
  holding a synthetic image, divided by k (fidelity robust to outliers, **higher is better**,
  about 1 for two samples of one distribution, can exceed 1). *coverage*: fraction of real
  balls holding at least one synthetic image (diversity robust to outliers, **higher is
  better**, 0..1).

Features, chosen by the caller (both are ``nn.Module`` s from uint8 (N, H, W) images to
float64 (N, D) features):

- :class:`RandomCNNFeatures`: a fixed, seeded random CNN (architecture in its docstring);
  needs no training and no download, sensitive to texture and sharpness at four scales.
- :class:`EncoderFeatures`: any trained network (a segmenter's or the Pix2Pix generator's
  down path) read through forward hooks on named layers; :func:`unet_encoder_features` picks
  the down-path convolutions of this project's U-Net.

Both were validated on phantom images before use (tests/test_image_quality.py): real vs blurred
real ranks real better on every number, two disjoint halves of the real images give KID within
two subset standard deviations of 0, and heavily corrupted images score worst.

prdc itself is not used: it is 50 lines over scikit-learn's pairwise distances, and installing it
pulls scikit-learn, joblib and threadpoolctl; :func:`prdc` is the same arithmetic with
``torch.cdist`` (tested against a brute-force reference).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ImageQualityConfig(BaseModel):
    """Settings of :func:`stage_quality`; the defaults are the papers' (KID: degree 3, prdc: k = 5)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    kid_subsets: int = Field(100, ge=1, description="random subsets averaged for KID")
    kid_subset_size: int = Field(1000, ge=2, description="images per side in a subset; capped at half the "
                                 "smaller side so that subsets differ and kid_std means something")
    kid_degree: int = Field(3, ge=1, description="polynomial kernel degree")
    nearest_k: int = Field(5, ge=1, description="k of the k-NN balls of precision/recall/density/coverage")
    min_images: int = Field(10, ge=2, description="fewer images on either side gives NaN with a reason")
    seed: int = Field(0, description="seed of the KID subsets")
    batch_size: int = Field(64, ge=1, description="images per feature-extractor call")


# ---------------------------------------------------------------- feature extractors


def _to_input(images, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W) or (N, 1, H, W) -> float32 (N, 1, H, W) on ``device``, 0..255 mapped to lo..hi."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey images (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    return x * ((hi - lo) / 255.0) + lo


def _pool(fmap: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and standard deviation of (N, C, H, W), float64 (N, 2C)."""
    f = fmap.double().flatten(2)
    return torch.cat([f.mean(dim=2), f.std(dim=2, unbiased=False)], dim=1)


class RandomCNNFeatures(nn.Module):
    """A fixed random CNN: four 3x3 conv + ReLU stages, 2x2 average pooling between them.

    Channels 1 -> 16 -> 32 -> 64 -> 128; conv weights drawn N(0, 2 / fan_in) (He) and biases
    N(0, 0.1) from ``torch.Generator().manual_seed(seed)``, on the CPU, so the same seed gives the
    same network everywhere. Input: uint8 images mapped to [-1, 1] (as Pix2Pix sees them).
    Output: for each stage, each channel's spatial mean and standard deviation, concatenated:
    2 * (16 + 32 + 64 + 128) = 480 float64 numbers per image, at full, 1/2, 1/4 and 1/8
    resolution. Each stage's block is multiplied by sqrt(480 / its width): every scale then
    weighs the same in dot products (KID's kernel) and distances (prdc), and coordinates are of
    order 1 (about 0.2-1.2 on phantom images; unscaled they are 0.1-0.2), the regime where KID's
    cubic kernel sees more than the feature means, as with Inception features. Random convolutional
    features are a recognised download-free embedding for these metrics (Naeem et al. 2020
    evaluate a randomly initialised VGG); the first stage sees single-pixel texture, so blur
    and noise move the features.
    """

    widths = (16, 32, 64, 128)

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], 1
        for c_out in self.widths:
            with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own init draws from the global generator
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, padding_mode="reflect")
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / (c_in * 9)))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
            convs.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.seed = seed
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return 2 * sum(self.widths)

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        x = _to_input(images, -1.0, 1.0, self.convs[0].weight.device)
        feats = []
        for i, conv in enumerate(self.convs):
            if i:
                x = nn.functional.avg_pool2d(x, 2)
            x = torch.relu(conv(x))
            feats.append(_pool(x) * math.sqrt(self.dim / x.shape[1]))
        return torch.cat(feats, dim=1)


class EncoderFeatures(nn.Module):
    """Features from a trained network: pooled outputs of named layers, read by forward hooks.

    ``model``: any ``nn.Module`` taking (N, 1, H, W) float images (e.g. the Pix2Pix generator or
    the usefulness segmenter); it is put in eval mode and frozen (BatchNorm uses its running
    statistics, dropout is off, so an image's features do not depend on its batch): pass a
    ``copy.deepcopy`` of a model that is still being trained.
    ``layers``: names from ``model.named_modules()`` whose outputs are pooled (per-channel mean
    and standard deviation, as :class:`RandomCNNFeatures`, each layer's block weighted by
    sqrt(D / its channel count) so that every layer counts the same). ``input_range``: what 0
    and 255 map to (Pix2Pix: (-1, 1)).

    A trained network's activation scale is its own, and KID's kernel is not scale-free, so call
    :meth:`calibrate` once on real training images: it sets ``scale`` so that the features' root
    mean square is 1 there (coordinates of order 1, as with RandomCNNFeatures), and keep that
    extractor for every comparison that is to be compared. precision/recall/density/coverage do
    not depend on ``scale``.
    The whole forward pass runs (hooks cannot stop it early); for a U-Net the decoder's cost is
    the price of not depending on how the model is built.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], input_range: tuple[float, float] = (-1.0, 1.0),
                 scale: float = 1.0):
        super().__init__()
        named = dict(model.named_modules())
        missing = [name for name in layers if name not in named]
        if not layers or missing:
            raise ValueError(f"layers {missing or list(layers)} not found in the model; choose from its "
                             f"named_modules(), e.g. {list(named)[1:6]}")
        self.model = model.eval().requires_grad_(False)
        self.layers = list(layers)
        self.input_range = input_range
        self.scale = float(scale)

    def train(self, mode: bool = True) -> "EncoderFeatures":
        super().train(False)  # always eval: features must not depend on the batch
        return self

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = _to_input(images, *self.input_range, device)
        captured: dict[str, torch.Tensor] = {}
        named = dict(self.model.named_modules())
        # hooks live only for this call: the model is left as it was for its other users
        handles = [named[name].register_forward_hook(_capture_into(captured, name)) for name in self.layers]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        maps = [captured[name] for name in self.layers]
        dim = 2 * sum(m.shape[1] for m in maps)
        return torch.cat([_pool(m) * math.sqrt(dim / m.shape[1]) for m in maps], dim=1) * self.scale

    def calibrate(self, images, batch_size: int = 64) -> "EncoderFeatures":
        """Set ``scale`` so that the features of ``images`` (real training images) have RMS 1."""
        self.scale = 1.0
        rms = float(extract_features(self, images, batch_size).square().mean().sqrt())
        if not math.isfinite(rms) or rms == 0:
            raise ValueError(f"cannot calibrate: the features' RMS is {rms}")
        self.scale = 1.0 / rms
        return self


def _capture_into(store: dict, name: str) -> Callable:
    def capture(_module, _inputs, output):
        store[name] = output
    return capture


def unet_encoder_layers(model: nn.Module) -> list[str]:
    """Names of the down-path convolutions of a U-Net (every ``nn.Conv2d``; the up path is ConvTranspose2d)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Conv2d]


def unet_encoder_features(generator: nn.Module, max_layers: int | None = 4,
                          input_range: tuple[float, float] = (-1.0, 1.0)) -> EncoderFeatures:
    """:class:`EncoderFeatures` over the first ``max_layers`` down-path convolutions of a trained U-Net.

    The deepest layers of this project's U-Net reach 1x1 px (a single spatial value, no texture
    left), so the default keeps the first four scales. For the Pix2Pix generator
    (``brvo_models.pix2pix.UnetGenerator``), inputs are mapped to [-1, 1] as in training.
    """
    layers = unet_encoder_layers(generator)
    if not layers:
        raise ValueError("no nn.Conv2d layers found: is this a U-Net?")
    return EncoderFeatures(generator, layers[:max_layers] if max_layers else layers, input_range)


def extract_features(extractor: nn.Module, images, batch_size: int = 64) -> torch.Tensor:
    """float64 (N, D) features of uint8 (N, H, W) images, ``batch_size`` images per call."""
    images = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    out = [extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double()


# ---------------------------------------------------------------- the numbers


def kid(real_features: torch.Tensor, fake_features: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, seed: int = 0) -> tuple[float, float, int]:
    """(KID mean, KID std over subsets, subset size used) via torchmetrics' KernelInceptionDistance.

    ``subset_size`` is capped at half the smaller set (at least 2), so that the random subsets
    differ. The subsets are drawn from torch's CPU generator seeded with ``seed`` inside
    ``fork_rng``: reproducible, and the caller's random state is left as it was.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    m = max(2, min(subset_size, min(len(real_features), len(fake_features)) // 2))
    if min(len(real_features), len(fake_features)) < m:
        raise ValueError(f"KID needs at least {m} images per side, got {len(real_features)} and {len(fake_features)}")
    with warnings.catch_warnings():
        # torchmetrics warns that it keeps every feature in memory: it is meant to, here.
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=m, degree=degree)
    metric = metric.to(real_features.device)
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), m


def prdc(real_features: torch.Tensor, fake_features: torch.Tensor, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) exactly as the ``prdc`` package computes them.

    Radii: distance to the k-th nearest neighbour within the same set, the point itself excluded
    (``prdc`` takes the (k+1)-th smallest distance including the zero to itself). "Inside a
    ball" is strict (<). Distances are exact Euclidean in float64 (no matmul shortcut).
    """
    real, fake = real_features.double(), fake_features.double()
    if min(len(real), len(fake)) <= nearest_k:
        raise ValueError(f"prdc with k={nearest_k} needs more than {nearest_k} images per side, "
                         f"got {len(real)} and {len(fake)}")

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

    real_radii = torch.kthvalue(dist(real, real), nearest_k + 1, dim=1).values
    fake_radii = torch.kthvalue(dist(fake, fake), nearest_k + 1, dim=1).values
    d = dist(real, fake)  # (n_real, n_fake)
    inside_real = d < real_radii[:, None]
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float((d < fake_radii[None, :]).any(dim=1).double().mean()),
        "density": float(inside_real.sum(dim=0).double().mean() / nearest_k),
        "coverage": float((d.min(dim=1).values < real_radii).double().mean()),
    }


NUMBERS = ("kid_mean", "kid_std", "precision", "recall", "density", "coverage")


def compare_features(real_features: torch.Tensor, fake_features: torch.Tensor,
                     config: ImageQualityConfig = ImageQualityConfig()) -> dict:
    """KID and prdc between two feature sets: a plain dict (NaN numbers and a reason when n is too small)."""
    n_real, n_fake = len(real_features), len(fake_features)
    out: dict = {"n_real": n_real, "n_synthetic": n_fake, **{k: math.nan for k in NUMBERS},
                 "kid_subset_size": 0, "kid_subsets": config.kid_subsets, "nearest_k": config.nearest_k,
                 "reason": None}
    need = max(config.min_images, config.nearest_k + 1, 4)
    if min(n_real, n_fake) < need:
        out["reason"] = (f"too few images: {n_real} real and {n_fake} synthetic, "
                         f"need at least {need} on each side")
        return out
    out["kid_mean"], out["kid_std"], out["kid_subset_size"] = kid(
        real_features, fake_features, subsets=config.kid_subsets, subset_size=config.kid_subset_size,
        degree=config.kid_degree, seed=config.seed)
    out.update(prdc(real_features, fake_features, config.nearest_k))
    return out


def _stage_key(stage) -> str:
    from storage.paired_format import STAGE_NAMES

    s = int(stage)
    return STAGE_NAMES[s] if 0 <= s < len(STAGE_NAMES) else str(s)


def stage_quality(synthetic_images, synthetic_stages, real_images, real_stages, *,
                  extractor: nn.Module | None = None, config: ImageQualityConfig = ImageQualityConfig(),
                  baseline_images=None, baseline_stages=None,
                  device: torch.device | str | None = None) -> dict[str, dict]:
    """Per stage (and "all" pooled): synthetic vs held-out real images, as plain dicts.

    Inputs: uint8 (N, H, W) image arrays and their integer stage arrays (0..5 = s1t1..s3t2).
    ``extractor``: a feature module (default :class:`RandomCNNFeatures` with seed 0), moved to
    ``device`` if given. Features are extracted once per image. Each stage present on either
    side gets {n_real, n_synthetic, kid_mean, kid_std, kid_subset_size, kid_subsets, precision,
    recall, density, coverage, nearest_k, reason}; numbers are NaN with a one-line ``reason``
    where a side has fewer than ``config.min_images`` images (or none).

    ``baseline_images`` / ``baseline_stages`` (optional, e.g. the real training images): the
    same numbers for these real images in place of the synthetic ones, under "baseline" in each
    stage's dict. Images of one patient resemble each other far more than images of two
    patients, so even real images of other patients score well below two halves of one image
    pool (on the 12-patient phantom, random CNN: precision 0.11 across patients vs 0.99 across
    random halves); the baseline is the ceiling a synthetic set can be read against.
    """
    syn_stages, real_stages = np.asarray(synthetic_stages).astype(int), np.asarray(real_stages).astype(int)
    if len(syn_stages) != len(synthetic_images) or len(real_stages) != len(real_images):
        raise ValueError(f"{len(synthetic_images)} synthetic images with {len(syn_stages)} stages, "
                         f"{len(real_images)} real images with {len(real_stages)} stages")
    if (baseline_images is None) != (baseline_stages is None):
        raise ValueError("give baseline_images and baseline_stages together")
    extractor = RandomCNNFeatures(seed=0) if extractor is None else extractor
    if device is not None:
        extractor = extractor.to(device)

    def features(images) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros((0, 0), dtype=torch.float64)
        return extract_features(extractor, images, config.batch_size)

    def rows(stages: np.ndarray, stage: int | None) -> torch.Tensor:
        return torch.as_tensor(np.ones(len(stages), bool) if stage is None else stages == stage)

    f_syn, f_real = features(synthetic_images), features(real_images)
    base = None
    if baseline_images is not None:
        base_stages = np.asarray(baseline_stages).astype(int)
        if len(base_stages) != len(baseline_images):
            raise ValueError(f"{len(baseline_images)} baseline images with {len(base_stages)} stages")
        base = (features(baseline_images), base_stages)
    out = {}
    stages = sorted(set(syn_stages.tolist()) | set(real_stages.tolist()))
    for key, stage in [(_stage_key(s), s) for s in stages] + [("all", None)]:
        real_f = f_real[rows(real_stages, stage)]
        out[key] = compare_features(real_f, f_syn[rows(syn_stages, stage)], config)
        if base is not None:
            out[key]["baseline"] = compare_features(real_f, base[0][rows(base[1], stage)], config)
    return out


def as_table(result: Mapping[str, Mapping]) -> list[dict]:
    """Rows (stage first) for a report table from :func:`stage_quality`'s dict."""
    return [{"stage": stage, **row} for stage, row in result.items()]
