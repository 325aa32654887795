"""Skip optimizer steps whose loss or gradients are not finite, without a host-device sync per step.

torch's fused AdamW reads an optional on-device ``found_inf`` flag and leaves parameters, moments and step
count untouched where it is 1 (the mechanism GradScaler uses), so the decision stays on the device. Only
optimizers without that hook (bitsandbytes' 8-bit AdamW) fall back to reading the flag on the host.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator


def nonfinite_flag(loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> torch.Tensor:
    """1.0 where the loss or the total gradient norm is inf/NaN, else 0.0 (float32, on the loss's device)."""
    finite = torch.isfinite(loss.detach())
    if grad_norm is not None:  # DeepSpeed clips inside its engine and returns no norm
        finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
    return (~finite).float().reshape(())


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (or the one accelerate wraps) honours ``found_inf``: torch's fused Adam/AdamW."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | float | None,
                          accelerator: Accelerator) -> torch.Tensor:
    """``optimizer.step()`` unless the step is non-finite; returns the on-device non-finite flag."""
    bad = nonfinite_flag(loss, grad_norm)
    if accelerator.scaler is not None:  # fp16: GradScaler finds inf/NaN gradients and skips the step itself
        optimizer.step()
    elif skips_on_device(optimizer):
        getattr(optimizer, "optimizer", optimizer).found_inf = bad
        optimizer.step()
    elif not bool(bad):  # host check: one sync per step
        optimizer.step()
    return bad


class NonFiniteCounter:
    """Skipped steps and the longest run of consecutive non-finite steps, counted on the device and read
    only when the loop logs."""

    def __init__(self, device: torch.device):
        self.skipped = torch.zeros((), device=device)
        self.run = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)

    def add(self, bad: torch.Tensor) -> None:
        self.skipped += bad
        self.run = (self.run + 1) * bad  # resets to 0 on a finite step
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[int, int]:
        """(skipped steps so far, longest consecutive run since the last read); one host read."""
        skipped, longest = (int(v) for v in torch.stack([self.skipped, self.longest]).cpu())  # one device-to-host copy
        self.longest = self.run.clone()
        return skipped, longest
