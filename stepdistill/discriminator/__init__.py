"""Discriminator modules for adversarial distillation: teacher features, light heads, GAN losses."""
from stepdistill.discriminator.heads import DiscriminatorHeads, FeatureHead
from stepdistill.discriminator.losses import discriminator_loss, generator_loss, r1_penalty

__all__ = ["DiscriminatorHeads", "FeatureHead", "discriminator_loss", "generator_loss", "r1_penalty"]
