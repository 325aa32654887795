"""The shipped ``emoji32`` dataset: 1,388 Noto Color Emoji glyphs at 32x32 with their Unicode names.

Rendered by ``scripts/build_emoji_dataset.py`` from Debian's fonts-noto-color-emoji (SIL OFL 1.1, see
``assets/emoji32_LICENSE.txt``) and stored as one compressed .npz inside the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

EMOJI32_FILE = "emoji32.npz"


@dataclass
class ImageCaptionSet:
    """An in-memory image-caption dataset: ``images`` uint8 (N, H, W, 3) and one caption per image."""

    images: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pixel_tensor(self) -> torch.Tensor:
        """All images as float (N, 3, H, W) in [-1, 1], the range diffusers VAEs expect."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def emoji32_path() -> Path:
    """Location of the shipped .npz inside the installed package."""
    return Path(str(resources.files("stepdistill.data") / "assets" / EMOJI32_FILE))


def load_emoji32(path: str | Path | None = None) -> ImageCaptionSet:
    """Load the shipped set (or another .npz written by the build script) without pickle."""
    with np.load(path or emoji32_path(), allow_pickle=False) as data:
        return ImageCaptionSet(images=data["images"], captions=[str(c) for c in data["captions"]])
