"""Opt-in wall-clock split of a training step (data / teacher / discriminator / student) for benchmarks.

Off by default: then ``timed`` costs one attribute check and adds no host-device synchronisation. When the
speed benchmark turns it on, CUDA work is synchronised at each section edge so the times are real.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class SectionTimer:
    """Accumulates seconds per named section while enabled; nested sections are excluded from their parent."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def reset(self, enabled: bool = True) -> None:
        self.enabled, self.totals, self._stack = enabled, defaultdict(float), []

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync()
        frame = [time.perf_counter(), 0.0]  # start, time spent in nested sections
        self._stack.append(frame)
        try:
            yield
        finally:
            _sync()
            elapsed = time.perf_counter() - frame[0]
            self._stack.pop()
            self.totals[name] += elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


STEP_TIMER = SectionTimer()


def timed(name: str):
    """``with timed("teacher"): ...`` adds the block's time to ``STEP_TIMER`` when it is enabled."""
    return STEP_TIMER.section(name)
