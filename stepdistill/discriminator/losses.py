"""GAN objectives on lists of patch logits (one tensor per discriminator head), averaged over heads."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GanLoss = Literal["hinge", "non_saturating"]


def _mean_over_heads(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.mean() for v in values]).mean()


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: GanLoss = "hinge") -> torch.Tensor:
    """Hinge: relu(1 - D(real)) + relu(1 + D(fake)); non-saturating: softplus(-D(real)) + softplus(D(fake))."""
    if kind == "hinge":
        return _mean_over_heads([F.relu(1 - r) for r in real]) + _mean_over_heads([F.relu(1 + f) for f in fake])
    return _mean_over_heads([F.softplus(-r) for r in real]) + _mean_over_heads([F.softplus(f) for f in fake])


def generator_loss(fake: list[torch.Tensor], kind: GanLoss = "hinge") -> torch.Tensor:
    """Hinge generator loss -D(fake); non-saturating softplus(-D(fake))."""
    if kind == "hinge":
        return -_mean_over_heads(fake)
    return _mean_over_heads([F.softplus(-f) for f in fake])


def r1_penalty(real_logits: list[torch.Tensor], real_inputs: list[torch.Tensor]) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): squared gradient norm of D(real) with respect to its inputs, here the
    teacher feature maps the heads see (the teacher itself is frozen)."""
    total = sum(logits.sum() for logits in real_logits)
    grads = torch.autograd.grad(total, real_inputs, create_graph=True)
    return torch.stack([g.pow(2).flatten(1).sum(1).mean() for g in grads]).mean()
