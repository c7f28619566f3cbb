"""Pix2Pix (Isola et al. 2017): OCTA image -> vessel label, faithful to the reference code.

Reference: junyanz/pytorch-CycleGAN-and-pix2pix (models/networks.py, models/pix2pix_model.py).
What is kept as there, because its labels are held against the reference model's:

* U-Net generator built from nested skip blocks, 4x4 stride-2 convolutions, LeakyReLU(0.2)
  on the way down, ReLU on the way up, dropout 0.5 in the inner ngf*8 decoder blocks, Tanh.
  ``num_downs = log2(image_size)`` so the bottleneck is 1x1 at every size (unet_256 = 8 downs).
* 70x70 PatchGAN (n_layers=3) on the channel-concatenated (image, label) pair.
* BatchNorm (affine) by default, InstanceNorm (no affine, no running stats) as an option;
  conv biases only when the norm is instance norm; normal(0, 0.02) init (BN weight N(1, 0.02)).
* Vanilla GAN loss = BCE-with-logits, D loss halved, G loss = GAN + lambda_L1 * L1.
* Adam(lr 2e-4, betas (0.5, 0.999)); lr constant, then linear decay to ~0 (the reference 'linear'
  policy, driven by :func:`brvo_models.training.fit`'s step clock).

Images and labels are one channel in [-1, 1]; a label probability is (tanh + 1) / 2.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from brvo_models.configs import Pix2PixConfig
from brvo_models.flips import flip_averaged
from brvo_models.identity import load_described
from brvo_models.losses import soft_dice_loss
from brvo_models import batched_metrics
from brvo_models.metrics import batch_dice, choose_threshold, cldice
from brvo_models.runtime import autocast, resolve_device
from storage.checkpoints import state_must_fit

MODEL_NAME = "pix2pix"


# ------------------------------------------------------------------------------------ networks


def _norm_layer(kind: str):
    if kind == "batch":
        return lambda c: nn.BatchNorm2d(c, affine=True)
    if kind == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    raise ValueError(f"unknown norm {kind!r}; choose 'batch' or 'instance'")


class UnetSkipBlock(nn.Module):
    """X -> [down -> submodule -> up] concatenated with X (the reference UnetSkipConnectionBlock)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule: nn.Module | None = None,
                 outermost: bool = False, innermost: bool = False, norm: str = "batch", use_dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        make_norm = _norm_layer(norm)
        use_bias = norm == "instance"
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        uprelu = nn.ReLU(True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, uprelu, upconv, make_norm(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, make_norm(inner_nc), submodule, uprelu, upconv, make_norm(outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net with ``num_downs`` downsamplings (>= 5); 2**num_downs px in -> 1x1 bottleneck."""

    def __init__(self, input_nc: int = 1, output_nc: int = 1, num_downs: int = 6, ngf: int = 64,
                 norm: str = "batch", use_dropout: bool = True):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"U-Net needs at least 5 downsamplings (32 px), got {num_downs}")
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout)
        block = UnetSkipBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
        block = UnetSkipBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
        block = UnetSkipBlock(ngf, ngf * 2, submodule=block, norm=norm)
        self.model = UnetSkipBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm=norm)
        # Not in the reference: the labelling threshold chosen on validation patients travels with
        # the weights (state_dict -> checkpoint), so every labeller uses the one it was selected with.
        self.register_buffer("label_threshold", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The reference NLayerDiscriminator; n_layers=3 has a 70x70 receptive field. Outputs logits."""

    def __init__(self, input_nc: int = 2, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        make_norm = _norm_layer(norm)
        use_bias = norm == "instance"
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias),
                    make_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias),
                make_norm(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference 'normal' init: conv weights N(0, gain), biases 0, BatchNorm weight N(1, gain)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def num_downs_for(image_size: int) -> int:
    """log2(image_size); the size must be a power of two >= 32 so the bottleneck is exactly 1x1."""
    n = int(round(math.log2(image_size))) if image_size > 0 else 0
    if image_size < 32 or 2**n != image_size:
        raise ValueError(f"Pix2Pix needs a power-of-two image size >= 32 (got {image_size})")
    return n


def build_generator(config: Pix2PixConfig, image_size: int) -> UnetGenerator:
    generator = init_weights(UnetGenerator(1, 1, num_downs_for(image_size), config.ngf, config.norm, config.dropout))
    # how it labels travels with it, as its threshold does: the threshold was chosen on labels made this way
    generator.flip_average = bool(config.flip_average)
    return generator


def build_discriminator(config: Pix2PixConfig) -> PatchDiscriminator:
    return init_weights(PatchDiscriminator(2, config.ndf, config.n_layers_d, config.norm))


# ----------------------------------------------------------------------------------- the model


def training_callables(G: nn.Module, D: nn.Module, config: Pix2PixConfig,
                       device: torch.device) -> tuple[nn.Module, nn.Module]:
    """What the training step calls for G and D: the modules, or with ``config.cuda_graphs`` on a CUDA
    device their ``torch.compile(mode="reduce-overhead")`` forms (CUDA graphs replay a whole forward or
    backward as one launch: batch 1 at 256 px is launch-bound, the GPU idles between kernels).
    Elsewhere the flag does nothing (CUDA graphs need CUDA; the training step logs it)."""
    if not (config.cuda_graphs and device.type == "cuda"):
        return G, D
    return (torch.compile(G, mode="reduce-overhead", dynamic=False),
            torch.compile(D, mode="reduce-overhead", dynamic=False))



def objective_text(p2p: Pix2PixConfig) -> str:
    """The generator's training objective in words, flagging any term the reference pix2pix lacks."""
    gan = "BCE PatchGAN" if p2p.lambda_gan == 1 else f"{p2p.lambda_gan:g} x BCE PatchGAN"
    text = f"{gan} + {p2p.lambda_l1:g} x L1"
    extra = [f"{w:g} x {name}" for name, w in (("soft Dice", p2p.lambda_dice), ("pixel BCE", p2p.lambda_bce)) if w > 0]
    if extra or p2p.lambda_gan != 1:
        text += "".join(f" + {e}" for e in extra) + " (not in the reference pix2pix)"
    else:
        text += " (the reference pix2pix objective)"
    return text


def _prep(images_uint8: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(images_uint8)
    if x.ndim == 3:
        x = x[:, None]
    return x.to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)


class Pix2Pix:
    """The Trainable (brvo_models.training) for Pix2Pix: G and D and their Adams (fit sets the lr).

    ``train_step`` takes ``(image, label)`` float tensors (B, 1, H, W) in [-1, 1];
    ``validate`` labels the validation arrays (uint8 images, 0/1 labels) and scores
    mean Dice (``score``) and clDice at the config's threshold.
    """

    name = MODEL_NAME

    def __init__(self, config: Pix2PixConfig, image_size: int, device: torch.device | str = "cpu",
                 val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 channels_last: bool = False, score_on: torch.device | str | None = "auto"):
        self.config = config
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G = build_generator(config, image_size).to(self.device, memory_format=self.memory_format)
        self.D = build_discriminator(config).to(self.device, memory_format=self.memory_format)
        betas = (config.beta1, config.beta2)
        # what train_step calls: the modules themselves, or (cuda_graphs on CUDA) their compiled forms; the
        # modules stay the ones checkpointed, so their state_dict keys never change
        self._train_G, self._train_D = training_callables(self.G, self.D, config, self.device)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=config.lr, betas=betas)
        self.gan_loss = nn.BCEWithLogitsLoss()
        self.l1 = nn.L1Loss()
        self.val_images = val_images
        self.val_labels = val_labels
        #: where validation scores are computed (batched_metrics.metrics_device): the GPU on CUDA, else
        #: None, the numpy path. Both give the same Dice (integer counts) and clDice (same skeletons).
        self.metrics_device = batched_metrics.metrics_device(self.device, score_on)

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_G, "D": self.opt_D}

    def _gan(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return self.gan_loss(logits.float(), target.float())

    def stage(self, batch):
        """(image, label) ready for :meth:`train_step` on the model's device: on CUDA copied up through
        pinned memory without blocking the host (fit's prefetch thread calls this); unchanged on CPU."""
        if self.device.type != "cuda":
            return batch
        return tuple(x if x.device == self.device else x.pin_memory().to(self.device, non_blocking=True)
                     for x in batch[:2])

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One reference optimize_parameters(): D step on (real, fake.detach()), then G step.

        Returns the losses as detached tensors on the model's device: nothing here waits for the
        GPU (fit sums them there and copies them to the host once per validation).
        """
        real_a, real_b = batch[0], batch[1]
        real_a = real_a.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        real_b = real_b.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self._train_G is not self.G:  # CUDA graphs: a new training iteration starts here
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device):
            fake_b = self._train_G(real_a)
        # D: real pair -> 1, fake pair -> 0
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        with autocast(self.device):
            pred_fake = self._train_D(torch.cat([real_a, fake_b.detach()], 1))
            pred_real = self._train_D(torch.cat([real_a, real_b], 1))
        loss_d_fake, loss_d_real = self._gan(pred_fake, False), self._gan(pred_real, True)
        loss_d = 0.5 * (loss_d_fake + loss_d_real)
        loss_d.backward()
        self.opt_D.step()
        # G: fool D and match the label (L1)
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        with autocast(self.device):
            pred_fake = self._train_D(torch.cat([real_a, fake_b], 1))
        loss_g_gan = self._gan(pred_fake, True)
        loss_g_l1 = self.l1(fake_b.float(), real_b.float()) * self.config.lambda_l1
        loss_g = loss_g_gan * self.config.lambda_gan + loss_g_l1
        losses = {"G_GAN": loss_g_gan, "G_L1": loss_g_l1}
        probabilities, targets = (fake_b.float() + 1.0) * 0.5, (real_b.float() + 1.0) * 0.5
        if self.config.lambda_dice > 0:
            loss_g_dice = soft_dice_loss(probabilities, targets) * self.config.lambda_dice
            loss_g = loss_g + loss_g_dice
            losses["G_Dice"] = loss_g_dice
        if self.config.lambda_bce > 0:
            # clamped: tanh saturates, and BCE of an exact 0 or 1 is infinite
            loss_g_bce = nn.functional.binary_cross_entropy(
                probabilities.clamp(1e-6, 1 - 1e-6), targets) * self.config.lambda_bce
            loss_g = loss_g + loss_g_bce
            losses["G_BCE"] = loss_g_bce
        loss_g.backward()
        self.opt_G.step()
        self.D.requires_grad_(True)
        return {k: v.detach() for k, v in {**losses, "D_real": loss_d_real, "D_fake": loss_d_fake}.items()}

    def validate(self) -> dict[str, float]:
        """Mean val Dice (the score) and clDice; with ``threshold=None`` also picks the threshold.

        The threshold maximising mean val Dice over :data:`brvo_models.metrics.THRESHOLD_GRID` is stored in
        the generator's ``label_threshold`` buffer (so it is saved with, and loaded from, each checkpoint).
        """
        if self.val_images is None or len(self.val_images) == 0:
            return {"score": 0.0}
        probs, _ = label_images(self.G, self.val_images, 0.5, batch_size=max(32, self.config.batch_size),
                                device=self.device)
        labels = np.asarray(self.val_labels)
        if self.metrics_device is not None:
            return self._validate_batched(probs, labels)
        if self.config.threshold is None:
            threshold, _ = choose_threshold(probs, labels)
        else:
            threshold = float(self.config.threshold)
        self.G.label_threshold.fill_(threshold)
        masks = probs > threshold
        d = batch_dice(masks, labels)
        c = [cldice(m, t) for m, t in zip(masks, labels)]
        return {"score": float(np.mean(d)), "dice": float(np.mean(d)), "cldice": float(np.mean(c)),
                "threshold": threshold}


    def _validate_batched(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """:meth:`validate`'s scores on ``metrics_device``: per-image values made there, averaged on the host
        in the numpy path's order (probabilities compared in float64, as numpy compares them)."""
        dev = self.metrics_device
        p = torch.from_numpy(probs).to(dev).double()
        t = torch.from_numpy(labels).to(dev)
        if self.config.threshold is None:
            threshold, _ = choose_threshold(p, t, lambda masks, truth: batched_metrics.dice(masks, truth).cpu().numpy())
        else:
            threshold = float(self.config.threshold)
        self.G.label_threshold.fill_(threshold)
        masks = p > threshold
        d = batched_metrics.dice(masks, t).cpu().numpy()
        c = batched_metrics.cldice(masks, t, skeleton_backend="torch").cpu().numpy()  # the port, as on CUDA
        return {"score": float(np.mean(d)), "dice": float(np.mean(d)), "cldice": float(np.mean(c)),
                "threshold": threshold}


# ----------------------------------------------------------------------------------- inference


def label_images(generator: nn.Module, images: np.ndarray, threshold: float | None = None, batch_size: int = 32,
                 device: torch.device | str | None = None,
                 flip_average: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label uint8 images (N, H, W): returns (probabilities float32 in [0, 1], masks uint8 0/1).

    Batched, no-grad, generator in eval mode (BatchNorm running stats, no dropout; its previous
    mode is restored). Probability = (tanh output + 1) / 2; mask = probability > threshold, where
    ``threshold=None`` uses the one stored with the generator (chosen on validation patients).
    ``flip_average=None`` follows the generator's ``flip_average`` (its config's): the probability
    is then the mean over the image's four flips (:func:`brvo_models.flips.flip_averaged`).
    """
    if threshold is None:
        threshold = float(getattr(generator, "label_threshold", torch.tensor(0.5)))
    if flip_average is None:
        flip_average = bool(getattr(generator, "flip_average", False))
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    n = images.shape[0]
    probs = np.zeros(images.shape, np.float32)
    if n == 0:
        return probs, np.zeros(images.shape, np.uint8)
    device = next(generator.parameters()).device if device is None else torch.device(device)
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = _prep(images[start:start + batch_size], device)
                with autocast(device):
                    y = flip_averaged(generator, x) if flip_average else generator(x)
                probs[start:start + batch_size] = ((y.float().clamp(-1, 1) + 1.0) * 0.5)[:, 0].cpu().numpy()
    finally:
        generator.train(was_training)
    return probs, (probs > threshold).astype(np.uint8)


def load_labeller(checkpoint_path: str | os.PathLike, device: torch.device | str = "auto",
                  image_size: int | None = None) -> tuple[UnetGenerator, torch.device]:
    """(trained generator in eval mode, its device) from ``checkpoint_path`` (best.pt).

    The generator is built from the Pix2Pix config stored in the checkpoint
    (:mod:`brvo_models.identity`), so it always matches the weights. ``device`` is 'auto'
    (CUDA when present), 'cpu', 'cuda' or a torch.device; ``image_size``, when given, must be
    the checkpoint's. Loads with weights_only=True and a verified sha256; a checkpoint of
    another model or image size raises a one-line CheckpointError.
    """
    loaded = load_described(checkpoint_path, MODEL_NAME, Pix2PixConfig, image_size)
    generator = build_generator(loaded.config, loaded.image_size)
    with state_must_fit(checkpoint_path):  # weights of another shape: a one-line CheckpointError
        generator.load_state_dict(loaded.state["modules"]["G"])
    device = resolve_device(device)
    return generator.to(device).eval(), device


# -------------------------------------------------------------------------------- augmentation


def aligned_augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                    max_rotation_deg: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips and small rotation applied to each (image, label) pair of a batch.

    ``images`` float (B, 1, H, W) in [0, 1], ``labels`` float 0/1 of the same shape. Every
    random number comes from ``generator`` in a fixed order, so an epoch seeded the same way
    augments the same way (exact resume). Images rotate bilinearly, labels with nearest
    neighbour so they stay 0/1; corners outside the field of view become 0 in both.
    """
    b = images.shape[0]
    hflip = torch.rand(b, generator=generator) < 0.5
    vflip = torch.rand(b, generator=generator) < 0.5
    angles = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
    flip_h = hflip.view(b, 1, 1, 1).to(images.device)
    flip_v = vflip.view(b, 1, 1, 1).to(images.device)
    images = torch.where(flip_h, images.flip(-1), images)
    labels = torch.where(flip_h, labels.flip(-1), labels)
    images = torch.where(flip_v, images.flip(-2), images)
    labels = torch.where(flip_v, labels.flip(-2), labels)
    if max_rotation_deg > 0:
        cos, sin = torch.cos(angles), torch.sin(angles)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        theta = theta.to(images.device, images.dtype)
        grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        images = nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = nn.functional.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, labels
