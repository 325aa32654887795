"""Trainable discriminator heads on frozen teacher feature maps (LADD, Sauer et al. 2024, sec. 3).

Each feature map gets its own small convolutional head that scores every location (a patch
discriminator). Heads are conditioned, projection-discriminator style (Miyato & Koyama 2018), on the
noise level the features were taken at and on a pooled text embedding.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def noise_level_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding of the re-noising timestep, normalised to [0, 1] first."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1))
    angles = (t.float() / num_train_timesteps)[:, None] * 1000.0 * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(channels, 32) or 1


class FeatureHead(nn.Module):
    """Scores one feature map (B, C, h, w) per location: two 3x3 convolutions, then a 1x1 logit plus the
    inner product of the features with a projection of the condition vector."""

    def __init__(self, in_channels: int, cond_dim: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
        )
        self.logit = nn.Conv2d(hidden, 1, 1)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.scale = hidden ** -0.5

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(features)
        projection = (h * self.cond_proj(cond)[:, :, None, None]).sum(1, keepdim=True) * self.scale
        return (self.logit(h) + projection).flatten(1)  # (B, h * w) patch logits


class DiscriminatorHeads(nn.Module):
    """One :class:`FeatureHead` per teacher feature map, sharing a condition encoder.

    Built from the channel counts of the feature maps, so the same class serves UNet feature pyramids
    and DiT token maps.
    """

    def __init__(self, feature_channels: list[int], text_dim: int, num_train_timesteps: int,
                 hidden: int = 64, noise_dim: int = 64):
        super().__init__()
        self.noise_dim, self.num_train_timesteps = noise_dim, num_train_timesteps
        self.cond = nn.Sequential(nn.Linear(noise_dim + text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(FeatureHead(c, hidden, hidden) for c in feature_channels)

    def forward(self, features: list[torch.Tensor], t: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """Patch logits per head for features taken at timesteps ``t`` (B,) with pooled text (B, D)."""
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} discriminator heads")
        cond = self.cond(torch.cat([noise_level_embedding(t, self.noise_dim, self.num_train_timesteps), text.float()], 1))
        return [head(f, cond) for head, f in zip(self.heads, features)]
