"""FID/KID agree with a direct computation; the evaluator's augmentations and weights round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from stepdistill.errors import ModelError
from stepdistill.evaluation.augment import augment
from stepdistill.evaluation.distances import fid_from_features, kid_from_features
from stepdistill.evaluation.emoji_evaluator import EmojiClassifier, load_evaluator
from stepdistill.training.step_random import StepRandom


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_and_behaves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 16))
    b = rng.normal(size=(600, 16)) * 1.3 + 0.5
    assert fid_from_features(a, b) == pytest.approx(direct_fid(a, b), rel=1e-5)
    assert abs(fid_from_features(a, a)) < 1e-6
    shifted = [fid_from_features(a, a + d) for d in (0.1, 0.5, 1.0)]
    assert shifted == sorted(shifted) and shifted[0] > 0
    assert shifted[2] == pytest.approx(16 * 1.0 ** 2, rel=1e-6)  # a pure mean shift adds |d|^2 per dimension


def test_kid_is_seeded_and_detects_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    state = np.random.get_state()
    same = kid_from_features(a, b, num_subsets=20, max_subset_size=100)
    assert np.array_equal(np.random.get_state()[1], state[1])  # caller's RNG untouched
    assert same == kid_from_features(a, b, num_subsets=20, max_subset_size=100)
    assert kid_from_features(a, b + 1.0, num_subsets=20, max_subset_size=100) > 10 * abs(same)


def test_augment_is_deterministic_per_step_and_keeps_range():
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    one = augment(x, StepRandom(0, 3, 0, 1, 6, torch.device("cpu")))
    two = augment(x, StepRandom(0, 3, 0, 1, 6, torch.device("cpu")))
    other = augment(x, StepRandom(0, 4, 0, 1, 6, torch.device("cpu")))
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert one.min() >= -1 and one.max() <= 1 and not torch.allclose(one, x, atol=0.05)


def test_evaluator_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = EmojiClassifier(10)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_evaluator(tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.features(torch.randn(2, 3, 64, 64)).shape == (2, 256)  # other resolutions are resized
    with pytest.raises(ModelError, match="not found"):
        load_evaluator(tmp_path / "missing.safetensors")
