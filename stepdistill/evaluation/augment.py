"""Batched, per-sample image augmentations for training the testbed evaluator.

Generated 32x32 emoji are off by a few pixels, slightly rescaled, recoloured, noisy or soft; the
evaluator must recognise them anyway, so it is trained on exactly those perturbations. All random
parameters come from a ``StepRandom``, so training is reproducible and resumable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stepdistill.training.step_random import StepRandom


def random_affine(x: torch.Tensor, rand: StepRandom, max_shift: float = 0.12, scale_range: float = 0.15) -> torch.Tensor:
    """Shift by up to ``max_shift`` of the width and scale by 1 +- ``scale_range``; edges are replicated
    (emoji32 borders are white, so this pads with the background)."""
    b = x.shape[0]
    scale = 1 + (rand.rand() * 2 - 1) * scale_range
    shift = (rand.rand(2) * 2 - 1) * max_shift * 2  # affine_grid coordinates span [-1, 1]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, rand: StepRandom, strength: float = 0.25) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation changes."""
    b = x.shape[0]
    brightness = ((rand.rand() * 2 - 1) * strength).view(b, 1, 1, 1)
    contrast = (1 + (rand.rand() * 2 - 1) * strength).view(b, 1, 1, 1)
    saturation = (1 + (rand.rand() * 2 - 1) * strength).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    gray = x.mean(dim=1, keepdim=True)
    return (gray + (x - gray) * saturation).clamp(-1, 1)


def random_blur(x: torch.Tensor, rand: StepRandom, max_sigma: float = 1.0) -> torch.Tensor:
    """Blend each image with a Gaussian-blurred copy by a random amount (cheap per-sample blur)."""
    sigma = max_sigma
    taps = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), kernel.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)
    amount = rand.rand().view(-1, 1, 1, 1).to(x)
    return x + amount * (blurred - x)


def gaussian_noise(x: torch.Tensor, rand: StepRandom, max_std: float = 0.1) -> torch.Tensor:
    """Additive noise of a random per-sample level."""
    std = (rand.rand() * max_std).view(-1, 1, 1, 1).to(x)
    return (x + std * rand.randn(*x.shape[1:]).to(x)).clamp(-1, 1)


def augment(x: torch.Tensor, rand: StepRandom) -> torch.Tensor:
    """The evaluator's full training augmentation, images in [-1, 1]."""
    return gaussian_noise(random_blur(colour_jitter(random_affine(x, rand), rand), rand), rand)
