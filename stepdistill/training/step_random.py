"""Randomness that depends only on (seed, step), never on process count or on a restored RNG state.

Each training step draws its noise for the whole *global* batch from a generator seeded with the step
number, and every process keeps only its own rows. So a resumed run sees exactly the noise of an
uninterrupted one, and an N-process run sees the same noise as a 1-process run with the same global batch.
"""
from __future__ import annotations

import torch


class StepRandom:
    """Per-step random draws for the local slice of a global batch."""

    def __init__(self, seed: int, step: int, rank: int, world_size: int, local_batch: int, device: torch.device):
        self.step = step  # the optimizer step being computed (methods with phases read it)
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)
        self.global_batch = local_batch * world_size
        self.device = device

    def _local(self, full: torch.Tensor, on_host: bool = False) -> torch.Tensor:
        return full[self.rows] if on_host else full[self.rows].to(self.device)

    def randn(self, *sample_shape: int) -> torch.Tensor:
        """Standard normal, shape (local_batch, *sample_shape)."""
        return self._local(torch.randn(self.global_batch, *sample_shape, generator=self.generator))

    def rand(self, *sample_shape: int, on_host: bool = False) -> torch.Tensor:
        """Uniform [0, 1), shape (local_batch, *sample_shape). ``on_host`` leaves it on the CPU: draws that
        steer Python control flow are then read without waiting for the accelerator."""
        return self._local(torch.rand(self.global_batch, *sample_shape, generator=self.generator), on_host)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """Integers in [low, high), one per local sample."""
        return self._local(torch.randint(low, high, (self.global_batch,), generator=self.generator))


def batch_indices(num_items: int, global_batch: int, step: int, seed: int, rank: int, local_batch: int) -> list[int]:
    """Dataset indices for one process at one step: a seeded permutation per epoch, no state to restore."""
    per_epoch = max(num_items // global_batch, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    if num_items < global_batch:  # tiny datasets: repeat the permutation to fill the batch
        order = order.repeat(global_batch // num_items + 1)
    start = position * global_batch + rank * local_batch
    return order[start:start + local_batch].tolist()
