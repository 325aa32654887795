"""Discriminator modules: teacher features for UNet and DiT, heads, GAN losses, R1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stepdistill.discriminator import DiscriminatorHeads, discriminator_loss, generator_loss, r1_penalty
from stepdistill.methods.adversarial import AdversarialOptions, AdversarialTerm, pooled_text
from stepdistill.teacher import load_teacher


@pytest.mark.parametrize("kind,expected_maps", [("sd", 7), ("sd3", 6)])
def test_heads_score_unet_and_dit_features_and_pass_gradients_to_the_input(random_teachers, kind, expected_maps):
    teacher = load_teacher(random_teachers / kind, max_sequence_length=8)
    embeds = teacher.encode_prompts(["rocket", "sun", "fire"])
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([100, 500, 900])
    feats = teacher.features(x, t, embeds)
    assert len(feats) == expected_maps and all(f.dim() == 4 and f.shape[0] == 3 for f in feats)
    if kind == "sd3":  # image tokens of a patch-1 DiT come back on the 8x8 latent grid
        assert all(f.shape[-2:] == (8, 8) for f in feats)
    heads = DiscriminatorHeads([f.shape[1] for f in feats], pooled_text(embeds).shape[-1], 1000, hidden=16)
    logits = heads(feats, t, pooled_text(embeds))
    assert [lg.shape for lg in logits] == [(3, f.shape[-2] * f.shape[-1]) for f in feats]
    generator_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the student is trained through the frozen teacher
    assert all(p.grad is not None for p in heads.parameters())


def test_heads_depend_on_noise_level_and_text():
    torch.manual_seed(0)
    heads = DiscriminatorHeads([8, 16], text_dim=12, num_train_timesteps=1000, hidden=16)
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    text = torch.randn(2, 12)
    base = heads(feats, torch.tensor([10, 10]), text)
    other_t = heads(feats, torch.tensor([900, 900]), text)
    other_text = heads(feats, torch.tensor([10, 10]), torch.randn(2, 12))
    assert not torch.allclose(base[0], other_t[0]) and not torch.allclose(base[0], other_text[0])


def test_gan_losses_match_their_definitions():
    real, fake = [torch.tensor([[2.0, 0.5]])], [torch.tensor([[-0.5, 1.5]])]
    # hinge: mean(relu(1 - r)) + mean(relu(1 + f)) = (0 + 0.5)/2 + (0.5 + 2.5)/2
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.25 + 1.5)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-0.5)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected = (softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-0.5) + softplus(1.5)) / 2
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected, rel=1e-5)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx((softplus(0.5) + softplus(-1.5)) / 2, rel=1e-5)


def test_r1_penalty_is_the_squared_input_gradient():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    weight = torch.randn(3, 2, 2)
    logits = [(x * weight).flatten(1).sum(1, keepdim=True)]  # linear: gradient is the weight
    expected = weight.pow(2).sum().item()
    assert r1_penalty(logits, [x]).item() == pytest.approx(expected, rel=1e-5)


def test_discriminator_step_learns_to_separate_two_latent_sets(random_teachers):
    """The heads alone (teacher frozen) learn to tell bright from dark latents within a few dozen updates."""
    from accelerate import Accelerator

    from stepdistill.training.step_random import StepRandom

    teacher = load_teacher(random_teachers / "sd")
    term = AdversarialTerm(teacher, teacher.model, AdversarialOptions(disc_learning_rate=1e-3, renoise_mean=-2.0), False, 0)
    term.prepare(Accelerator(cpu=True))
    embeds = teacher.encode_prompts(["rocket"] * 8)
    real, fake = torch.full((8, 4, 8, 8), 1.0), torch.full((8, 4, 8, 8), -1.0)
    for step in range(40):
        logs = term.discriminator_step(real, fake, embeds, StepRandom(0, step, 0, 1, 8, torch.device("cpu")))
    rand = StepRandom(0, 999, 0, 1, 8, torch.device("cpu"))
    assert logs["d_real"] > logs["d_fake"]
    assert (term.scores(real, embeds, rand) > term.scores(fake, embeds, rand).max()).all()
