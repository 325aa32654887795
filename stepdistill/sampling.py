"""Few-line sampling through the teacher wrapper: the same code samples teachers and students."""
from __future__ import annotations

import torch

from stepdistill.solvers import sample_ddim, sampling_grid
from stepdistill.teacher import TeacherWrapper


def latent_shape(teacher: TeacherWrapper) -> tuple[int, int, int]:
    """(C, H, W) of the denoiser's latents, read from its config."""
    return teacher.latent_channels, teacher.latent_size, teacher.latent_size


def initial_noise(teacher: TeacherWrapper, batch: int, seed: int) -> torch.Tensor:
    """Seeded starting latents, identical for teacher and students so their outputs can be compared."""
    return torch.randn(batch, *latent_shape(teacher), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_latents(teacher: TeacherWrapper, prompts: list[str], num_steps: int, guidance_scale: float,
                   noise: torch.Tensor, spacing: str = "trailing") -> torch.Tensor:
    """Deterministic DDIM (vp) or Euler (flow) sampling in ``num_steps`` model evaluations (x2 with CFG)."""
    embeds = teacher.encode_prompts(prompts)
    uncond = teacher.empty_prompt(len(prompts))
    grid = sampling_grid(teacher.schedule, num_steps, spacing)
    device = next(teacher.model.parameters()).device
    return sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance_scale, uncond=uncond),
                       noise.to(device), grid, teacher.schedule)


@torch.no_grad()
def decode(teacher: TeacherWrapper, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], undoing the VAE's scaling (and SD3's shift)."""
    vae = teacher.pipe.vae
    latents = latents / vae.config.scaling_factor
    if teacher.schedule.kind == "flow" and vae.config.get("shift_factor") is not None:
        latents = latents + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.float().clamp(-1, 1)
