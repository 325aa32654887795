"""Logged values kept on the device between logging steps, so the hot loop never waits to read a scalar."""
from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


class LogWindow:
    """Sums tensor values over the steps of one logging window; plain numbers keep their latest value."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.latest: dict[str, Any] = {}
        self.steps = 0

    def add(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
                self.sums[name] = self.sums[name] + value if name in self.sums else value
            else:
                self.latest[name] = value
        self.steps += 1

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Window means averaged over processes (the same numbers on 1 or N processes), then reset."""
        out = dict(self.latest)
        if self.sums:
            names = list(self.sums)
            means = accelerator.reduce(torch.stack([self.sums[n] for n in names]) / self.steps, reduction="mean")
            out.update((name, float(value)) for name, value in zip(names, means.cpu()))  # one device-to-host copy
        self.sums, self.steps = {}, 0
        return out
