"""A small U-Net vessel segmenter for the usefulness experiment.

It reuses the Pix2Pix U-Net (no adversary): probability = (tanh + 1) / 2, trained
with BCE + soft Dice for a fixed number of optimisation steps, so 'real only' and
'real + synthetic' get the same compute and differ only in the data they sample.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from brvo_models.metrics import label_scores, mean_scores
from brvo_models.pix2pix import UnetGenerator, aligned_augment, init_weights, num_downs_for
from brvo_models.runtime import autocast, select_device


def train_segmenter(images: np.ndarray, labels: np.ndarray, *, image_size: int, steps: int, batch_size: int = 16,
                    ngf: int = 8, lr: float = 1e-3, seed: int = 0, device: str = "auto") -> UnetGenerator:
    """Train on uint8 images (N, H, W) and 0/1 labels for ``steps`` batches sampled with replacement."""
    torch.manual_seed(seed)
    dev = select_device(device)
    net = init_weights(UnetGenerator(1, 1, num_downs_for(image_size), ngf, "batch", use_dropout=False)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999))
    x_all = torch.from_numpy(np.asarray(images, np.float32) / 255.0)[:, None]
    y_all = torch.from_numpy(np.asarray(labels, np.float32))[:, None]
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x, y = aligned_augment(x_all[idx], y_all[idx], g)
        x, y = x.to(dev) * 2 - 1, y.to(dev)
        with autocast(dev):
            p = (net(x).float() + 1) * 0.5
        p = p.clamp(1e-5, 1 - 1e-5)
        inter = (p * y).sum(dim=(1, 2, 3))
        soft_dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)) + 1)
        loss = F.binary_cross_entropy(p, y) + soft_dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def evaluate_segmenter(net: UnetGenerator, images: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Mean Dice, IoU and clDice over uint8 test images (N, H, W) against 0/1 labels."""
    dev = next(net.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(images, np.float32) / 255.0)[:, None].to(dev) * 2 - 1
        p = ((net(x).float() + 1) * 0.5)[:, 0].cpu().numpy()
    return mean_scores([label_scores(pi > threshold, li) for pi, li in zip(p, labels)])
