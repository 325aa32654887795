"""The adversarial term shared by LADD and (optionally) LCM: re-noise latents, read the frozen teacher's
features, score them with trainable heads, update the heads, return the student's generator loss.

The discriminator's optimizer lives here rather than in the shared loop; it is prepared by the same
accelerator, so its heads and optimizer state are part of every checkpoint and are synced across processes
(under FSDP: plain DDP, and the trainer checkpoints them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from stepdistill.discriminator import DiscriminatorHeads, discriminator_loss, generator_loss, r1_penalty
from stepdistill.errors import ConfigError
from stepdistill.methods.folded_lora import BaseTwin
from stepdistill.sampling import latent_shape
from stepdistill.teacher import PromptEmbeds, TeacherWrapper
from stepdistill.training.deepspeed_setup import uses_deepspeed
from stepdistill.training.nonfinite import step_unless_nonfinite
from stepdistill.training.sharding import is_sharded
from stepdistill.training.step_random import StepRandom
from stepdistill.training.timing import timed


@dataclass
class AdversarialOptions:
    """Discriminator options (LADD; also LCM's optional adversarial term)."""

    gan_loss: Literal["hinge", "non_saturating"] = "hinge"  # GAN objective of heads and student
    disc_learning_rate: float = 1e-4  # AdamW learning rate of the discriminator heads
    disc_hidden: int = 64  # channels of each discriminator head
    disc_r1_weight: float = 0.0  # R1 gradient penalty on real features (0: off)
    renoise_mean: float = 0.0  # logit-normal re-noising levels for the discriminator: mean of the logit
    renoise_std: float = 1.0  # ... and its standard deviation

    def validate_adversarial(self) -> None:
        if not self.disc_learning_rate > 0:
            raise ConfigError(f"disc_learning_rate={self.disc_learning_rate} must be positive")
        if self.disc_hidden < 1:
            raise ConfigError(f"disc_hidden={self.disc_hidden} must be at least 1")
        if self.disc_r1_weight < 0 or self.renoise_std <= 0:
            raise ConfigError(f"disc_r1_weight={self.disc_r1_weight} must be >= 0 and renoise_std={self.renoise_std} > 0")


def pooled_text(embeds: PromptEmbeds) -> torch.Tensor:
    """One vector per prompt for the heads' condition: the pooled embedding (SD3, SDXL), else the mean state of
    the prompt's tokens (padding left out where an attention mask marks it, as for PixArt's T5)."""
    if embeds.pooled is not None:
        return embeds.pooled
    if embeds.mask is None:
        return embeds.hidden.mean(1)
    weights = embeds.mask.to(embeds.hidden.dtype).unsqueeze(-1)
    return (embeds.hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _heads_outside_accelerate(accelerator: Accelerator) -> bool:
    """True where the heads must not go through ``accelerate.prepare``: under FSDP it would shard them with the
    student's wrap policy, under DeepSpeed it would make them a second engine (accelerate takes one model)."""
    return is_sharded(accelerator) or uses_deepspeed(accelerator)


class AdversarialTerm:
    """Teacher-feature discriminator with its own optimizer, trained inside the student's step."""

    def __init__(self, teacher: TeacherWrapper, feature_net: torch.nn.Module, opts: AdversarialOptions,
                 lora_student: bool, seed: int):
        self.teacher, self.feature_net, self.opts, self.lora_student = teacher, feature_net, opts, lora_student
        self.feature_base = BaseTwin(feature_net) if lora_student else None  # the teacher without peft's layers
        if not lora_student:
            feature_net.requires_grad_(False)  # a separate frozen teacher: gradients only pass through it
        probe_x = torch.zeros(1, *latent_shape(teacher), device=next(feature_net.parameters()).device)
        probe_embeds = teacher.encode_prompts([""])
        with torch.no_grad():
            maps = self.features(probe_x, torch.tensor([teacher.schedule.num_train_timesteps // 2]), probe_embeds)
        torch.manual_seed(seed + 1)
        self.heads = DiscriminatorHeads([m.shape[1] for m in maps], pooled_text(probe_embeds).shape[-1],
                                        teacher.schedule.num_train_timesteps, hidden=opts.disc_hidden)
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=opts.disc_learning_rate, betas=(0.0, 0.99), fused=True)
        self.accelerator: Accelerator | None = None
        self.prepared_heads: torch.nn.Module = self.heads

    def prepare(self, accelerator: Accelerator) -> None:
        """Register heads and optimizer with the run's accelerator (device, DDP, checkpoints). Under FSDP and
        DeepSpeed accelerate cannot take them beside the student (see :func:`_heads_outside_accelerate`): there
        the heads are replicated with plain DDP and checkpointed by the trainer (:meth:`checkpoint_objects`)."""
        self.accelerator = accelerator
        if _heads_outside_accelerate(accelerator):
            if accelerator.scaler is not None:
                raise ConfigError("mixed_precision=fp16 cannot train discriminator heads under FSDP (their optimizer is "
                                  "outside accelerate's gradient scaler there); use mixed_precision=bf16")
            self.heads.to(accelerator.device)
            cuda = accelerator.device.type == "cuda"
            self.prepared_heads = DistributedDataParallel(self.heads, device_ids=[accelerator.device.index] if cuda else None)
            return
        self.prepared_heads, self.optimizer = accelerator.prepare(self.heads, self.optimizer)

    def checkpoint_objects(self) -> list[Any]:
        """What the trainer must checkpoint itself: the heads and their optimizer where accelerate does not
        (FSDP and DeepSpeed runs), else nothing."""
        outside = self.accelerator is not None and _heads_outside_accelerate(self.accelerator)
        return [self.heads, self.optimizer] if outside else []

    def features(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> list[torch.Tensor]:
        """Frozen teacher features; in LoRA mode the teacher is the student network's base twin (no adapter layers)."""
        net = self.feature_base() if self.feature_base is not None else self.feature_net
        return self.teacher.with_model(net).features(x, t, embeds)

    def renoise(self, x0: torch.Tensor, rand: StepRandom) -> tuple[torch.Tensor, torch.Tensor]:
        """x_s = alpha_s x0 + sigma_s eps with s/T drawn from a logit-normal (LADD sec. 3.2)."""
        schedule = self.teacher.schedule
        u = torch.sigmoid(self.opts.renoise_mean + self.opts.renoise_std * rand.randn())
        if schedule.kind == "flow":
            t = (u * schedule.num_train_timesteps).clamp_min(1.0)
        else:
            t = (u * (schedule.num_train_timesteps - 1)).round().long()
        alpha, sigma = schedule.alpha_sigma(t)
        noise = rand.randn(*x0.shape[1:]).to(x0)
        return t, alpha.view(-1, 1, 1, 1).to(x0) * x0 + sigma.view(-1, 1, 1, 1).to(x0) * noise

    def _logits(self, x0: torch.Tensor, embeds: PromptEmbeds, rand: StepRandom) -> list[torch.Tensor]:
        """Patch logits of re-noised ``x0`` from the unwrapped heads (no gradient sync for them)."""
        t, x_s = self.renoise(x0, rand)
        return self.heads(self.features(x_s, t, embeds), t, pooled_text(embeds))

    def discriminator_step(self, real_x0: torch.Tensor, fake_x0: torch.Tensor, embeds: PromptEmbeds,
                           rand: StepRandom) -> dict[str, torch.Tensor]:
        """One update of the heads on real and (detached) student latents; returns logging values (on the device)."""
        with timed("discriminator"):
            return self._discriminator_step(real_x0, fake_x0, embeds, rand)

    def _discriminator_step(self, real_x0: torch.Tensor, fake_x0: torch.Tensor, embeds: PromptEmbeds,
                            rand: StepRandom) -> dict[str, torch.Tensor]:
        assert self.accelerator is not None, "prepare() the adversarial term before training"
        batch = real_x0.shape[0]
        (t_real, x_real), (t_fake, x_fake) = self.renoise(real_x0, rand), self.renoise(fake_x0.detach(), rand)
        t, x_s = torch.cat([t_real, t_fake]), torch.cat([x_real, x_fake])
        with torch.no_grad():
            feats = self.features(x_s, t, PromptEmbeds.cat([embeds, embeds]))
        use_r1 = self.opts.disc_r1_weight > 0
        real_inputs = [f[:batch].detach().requires_grad_(use_r1) for f in feats]
        inputs = [torch.cat([r, f[batch:]]) for r, f in zip(real_inputs, feats)]
        logits = self.prepared_heads(inputs, t, pooled_text(PromptEmbeds.cat([embeds, embeds])))
        real, fake = [lg[:batch] for lg in logits], [lg[batch:] for lg in logits]
        loss = discriminator_loss(real, fake, self.opts.gan_loss)
        logs = {"d_loss": loss.detach()}
        if use_r1:
            penalty = r1_penalty(real, real_inputs)
            loss = loss + self.opts.disc_r1_weight * penalty
            logs["d_r1"] = penalty.detach()
        self.optimizer.zero_grad(set_to_none=True)
        if _heads_outside_accelerate(self.accelerator):  # accelerate's calls would reach the student's engine
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.heads.parameters(), 1.0)
        else:
            self.accelerator.backward(loss)
            norm = self.accelerator.clip_grad_norm_(self.prepared_heads.parameters(), 1.0)
        step_unless_nonfinite(self.optimizer, loss, norm, self.accelerator)
        self.optimizer.zero_grad(set_to_none=True)
        logs["d_real"] = torch.cat([r.detach().flatten() for r in real]).mean()
        logs["d_fake"] = torch.cat([f.detach().flatten() for f in fake]).mean()
        return logs

    def generator_loss(self, fake_x0: torch.Tensor, embeds: PromptEmbeds, rand: StepRandom) -> torch.Tensor:
        """Adversarial loss of the student's latents; gradients reach the student through the frozen
        teacher features."""
        return generator_loss(self._logits(fake_x0, embeds, rand), self.opts.gan_loss)

    def student_term(self, real_x0: torch.Tensor, fake_x0: torch.Tensor, embeds: PromptEmbeds,
                     rand: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What a trainer adds to its own loss: one head update on real and (detached) student latents, then
        the student's generator loss. Returns (generator loss, logging values including it)."""
        logs = self.discriminator_step(real_x0, fake_x0, embeds, rand)
        g_loss = self.generator_loss(fake_x0, embeds, rand)
        logs["g_loss"] = g_loss.detach()
        return g_loss, logs

    @torch.no_grad()
    def scores(self, x0: torch.Tensor, embeds: PromptEmbeds, rand: StepRandom) -> torch.Tensor:
        """Mean logit per sample (B,) for evaluation: higher means 'looks like the data'."""
        return torch.stack([lg.mean(1) for lg in self._logits(x0, embeds, rand)]).mean(0)
