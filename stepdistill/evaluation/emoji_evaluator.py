"""The testbed evaluator: a small CNN that tells the 1,388 emoji32 classes apart.

Inception and CLIP weights cannot be downloaded here, so the testbed measures quality with its own
network: its penultimate features are the FID/KID feature space, and its prediction says whether a
generated image shows the prompted emoji (prompt alignment, top-1 / top-5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from stepdistill.data.emoji32 import ImageCaptionSet
from stepdistill.errors import ModelError
from stepdistill.evaluation.augment import augment
from stepdistill.training.step_random import StepRandom

WEIGHTS_FILE = "emoji_evaluator.safetensors"


def _block(cin: int, cout: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU(),
                               torch.nn.Conv2d(cout, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU())


class EmojiClassifier(torch.nn.Module):
    """32x32 RGB in [-1, 1] -> 256-d features -> class logits (32 -> 16 -> 8 -> 4 pixel stages)."""

    feature_dim = 256

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        pool = torch.nn.AvgPool2d(2)
        self.trunk = torch.nn.Sequential(_block(3, width), pool, _block(width, 2 * width), pool,
                                         _block(2 * width, 4 * width), pool, _block(4 * width, self.feature_dim))
        self.head = torch.nn.Linear(self.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (global average pool): the testbed's FID/KID space."""
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.trunk(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class EvaluatorMethod:
    """Shared-loop method: cross-entropy on augmented emoji, one class per image."""

    name = "testbed-evaluator"
    export_name = "evaluator"

    def __init__(self, data: ImageCaptionSet, seed: int = 0):
        torch.manual_seed(seed)
        self.pixels = data.pixel_tensor()
        self.captions = data.captions
        self.model = EmojiClassifier(len(data))

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def num_items(self) -> int:
        return len(self.pixels)

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        return {"pixels": self.pixels[indices].to(device), "labels": torch.tensor(indices, device=device)}

    def compute_loss(self, model, batch, rand: StepRandom):
        logits = model(augment(batch["pixels"], rand))
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"train_top1": float((logits.argmax(1) == batch["labels"]).float().mean())}

    def after_optimizer_step(self, model) -> None:
        pass

    def checkpoint_objects(self) -> list[Any]:
        return []

    def validate(self, model, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        accuracy = held_out_accuracy(model, self.pixels, seed=10_000 + step)
        accelerator.log({"heldout_augmented_top1": accuracy}, step=step)

    def export(self, model, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE),
                  metadata={"num_classes": str(len(self.captions))})


@torch.no_grad()
def held_out_accuracy(model: EmojiClassifier, pixels: torch.Tensor, seed: int, batch: int = 512) -> float:
    """Top-1 accuracy on freshly augmented copies of every image (augmentations never seen in training)."""
    model.eval()
    correct = 0
    for start in range(0, len(pixels), batch):
        chunk = pixels[start:start + batch]
        rand = StepRandom(seed, start, 0, 1, len(chunk), chunk.device)
        correct += int((model(augment(chunk, rand)).argmax(1) == torch.arange(start, start + len(chunk))).sum())
    model.train()
    return correct / len(pixels)


def shipped_evaluator_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("stepdistill.evaluation") / "assets" / WEIGHTS_FILE))


def load_evaluator(path: str | Path | None = None) -> EmojiClassifier:
    """Load evaluator weights (safetensors only); defaults to the one shipped with the package."""
    path = Path(path) if path is not None else shipped_evaluator_path()
    if not path.is_file():
        raise ModelError(f"evaluator weights {str(path)!r} not found; train them with "
                         "train_scripts/train_evaluator.py or pass the exported emoji_evaluator.safetensors")
    state = load_file(str(path))
    model = EmojiClassifier(state["head.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
