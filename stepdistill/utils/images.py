"""Image grids for validation samples and reports."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def grid_image(images: torch.Tensor, nrow: int, scale: int = 2) -> Image.Image:
    """Tile a batch in [-1, 1] into one PIL image, ``nrow`` images per row, upscaled without smoothing."""
    pixels = to_uint8(images)
    b, h, w, _ = pixels.shape
    rows = -(-b // nrow)
    canvas = torch.full((rows * h, nrow * w, 3), 255, dtype=torch.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, nrow)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    image = Image.fromarray(canvas.numpy())
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Write ``images`` (B, 3, H, W) in [-1, 1] as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, scale).save(path)
    return path
