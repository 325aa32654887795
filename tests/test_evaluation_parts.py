"""FID/KID agree with a direct computation; the evaluator's augmentations and weights round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from stepdistill.errors import ModelError
from stepdistill.evaluation.augment import augment
from stepdistill.evaluation.distances import fid_from_features, kid_from_features, paired_kid_from_features
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


def direct_paired_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731 - KID's cubic kernel
    m = len(x)
    total = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i in range(m) for j in range(m) if i != j)
    return total / (m * (m - 1))


def test_paired_kid_matches_the_u_statistic_and_fixes_the_label_aligned_bias():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.3
    assert paired_kid_from_features(a, b) == pytest.approx(direct_paired_mmd2(a, b), rel=1e-9)
    assert paired_kid_from_features(a, a) == 0.0
    shifted = [paired_kid_from_features(a, a + d) for d in (0.2, 0.5, 1.0)]
    assert shifted == sorted(shifted) and shifted[0] > 0
    # The testbed's design: one real image per prompt, the generated set holds a close match of each.
    # clean-fid's independent-sample estimator goes clearly negative; the paired one stays >= 0.
    classes = rng.normal(size=(256, 32)) * 1.7
    generated = classes + 0.1 * rng.normal(size=classes.shape)
    assert kid_from_features(classes, generated, max_subset_size=256) < -0.05
    assert 0 <= paired_kid_from_features(classes, generated) < 0.01
    with pytest.raises(ValueError, match="equal shape"):
        paired_kid_from_features(a, b[:10])


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


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    from stepdistill.evaluation.inception import inception_feature_extractor

    monkeypatch.setenv("STEPDISTILL_INCEPTION_WEIGHTS", str(tmp_path / "inception.pt"))
    with pytest.raises(ModelError, match="Inception weights not found at .*inception.pt"):
        inception_feature_extractor()


def test_clip_score_equals_manual_cosine(tmp_path, tokenizer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stepdistill.evaluation.clip_score import clip_score, load_clip

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    model, processor = load_clip(tmp_path / "clip")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["rocket", "sun", "red apple"]
    scores = clip_score(model, processor, images, prompts)
    inputs = processor(text=prompts, images=list(((images + 1) * 127.5).round().to(torch.uint8)), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    expected = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).clamp_min(0)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelError, match="CLIP model .* not found"):
        load_clip(tmp_path / "nope")
