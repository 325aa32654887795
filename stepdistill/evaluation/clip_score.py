"""CLIP score from a locally stored CLIP model: 100 x max(cos(image, text), 0) (Hessel et al. 2021).

Computed directly with transformers' ``CLIPModel``; torchmetrics' CLIPScore breaks with transformers 5.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPModel, CLIPProcessor

from stepdistill.errors import ModelError


def load_clip(path: str | Path) -> tuple[CLIPModel, CLIPProcessor]:
    """Load a CLIP model folder offline (safetensors, no remote code)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"CLIP model {str(path)!r} not found; give a local folder saved with CLIPModel.save_pretrained "
                         "(e.g. a downloaded openai/clip-vit-large-patch14 snapshot)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


def _embedding(output: torch.Tensor | object) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def clip_score(model: CLIPModel, processor: CLIPProcessor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-image CLIP score for images in [-1, 1] (B, 3, H, W) against their prompts."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
    image_emb = _embedding(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text_emb = _embedding(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    return 100 * cosine.clamp_min(0)
