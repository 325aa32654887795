"""The shipped testbed evaluator recognises emoji32, plain and under unseen augmentations."""
from __future__ import annotations

import torch

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.evaluation.emoji_evaluator import held_out_accuracy, load_evaluator
from stepdistill.evaluation.metrics import evaluator_outputs, topk_alignment


def test_shipped_evaluator_accuracy():
    evaluator = load_evaluator()
    pixels = load_emoji32().pixel_tensor()
    labels = torch.arange(len(pixels))
    features, logits = evaluator_outputs(evaluator, pixels)
    assert features.shape == (1388, 256)
    assert topk_alignment(logits, labels, 1) >= 0.99  # the real data itself
    assert held_out_accuracy(evaluator, pixels, seed=987_654) >= 0.95  # augmentations it never saw


def test_evaluator_features_separate_real_from_blurred():
    from stepdistill.evaluation.distances import fid_from_features

    evaluator = load_evaluator()
    pixels = load_emoji32().pixel_tensor()
    half_a, half_b = pixels[0::2], pixels[1::2]
    blurred = torch.nn.functional.avg_pool2d(half_b, 3, stride=1, padding=1, count_include_pad=False)
    feats = lambda x: evaluator_outputs(evaluator, x)[0]  # noqa: E731
    same_distribution = fid_from_features(feats(half_a), feats(half_b))
    degraded = fid_from_features(feats(half_a), feats(blurred))
    assert degraded > same_distribution
