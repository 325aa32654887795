"""Per-image-set metrics on the testbed: evaluator FID/KID, prompt alignment and teacher fidelity."""
from __future__ import annotations

import torch

from stepdistill.evaluation.distances import fid_from_features, paired_kid_from_features
from stepdistill.evaluation.emoji_evaluator import EmojiClassifier


@torch.no_grad()
def evaluator_outputs(evaluator: EmojiClassifier, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) for images in [-1, 1], in batches."""
    feats = torch.cat([evaluator.features(chunk) for chunk in images.split(batch)])
    return feats, evaluator.head(feats)


def topk_alignment(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of images whose prompted class is among the evaluator's top-k guesses."""
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def image_set_metrics(evaluator: EmojiClassifier, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                      reference: torch.Tensor | None = None) -> dict[str, float]:
    """All testbed numbers for one generated set (and its teacher reference, same prompts and noise).
    ``real_features`` row k are the evaluator features of the real image of ``labels[k]``."""
    feats, logits = evaluator_outputs(evaluator, images)
    row = {
        "fid": fid_from_features(real_features, feats),
        "kid": paired_kid_from_features(real_features, feats),
        "top1": topk_alignment(logits, labels, 1),
        "top5": topk_alignment(logits, labels, 5),
    }
    if reference is not None:
        ref_feats, _ = evaluator_outputs(evaluator, reference)
        row["psnr_vs_teacher"] = psnr(images, reference)
        row["feature_dist_vs_teacher"] = (feats - ref_feats).norm(dim=1).mean().item()
    return row
