"""Teacher-generated training latents (LADD's synthetic data), generated once and cached on disk.

Each latent is stored with the noise it was sampled from, so (noise -> teacher output) pairs are
available for an optional regression term. The cache is keyed by its settings: a resumed run with other
settings is refused instead of silently mixing two datasets.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stepdistill.errors import ConfigError
from stepdistill.methods.common import adapters_disabled
from stepdistill.sampling import initial_noise, sample_latents
from stepdistill.teacher import TeacherWrapper


@torch.no_grad()
def generate_teacher_latents(teacher: TeacherWrapper, prompts: list[str], steps: int, guidance_scale: float, seed: int,
                             batch: int = 64, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, noise): the teacher's deterministic ``steps``-step guided samples of ``prompts``."""
    noise = initial_noise(teacher, len(prompts), seed)
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="teacher latents", disable=not show_progress):
        out.append(sample_latents(teacher, prompts[start:start + batch], steps, guidance_scale, noise[start:start + batch]).cpu())
    return torch.cat(out), noise


def cached_teacher_latents(path: Path, teacher: TeacherWrapper, prompts: list[str], steps: int, guidance_scale: float,
                           seed: int, accelerator: Accelerator, lora_student: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the cache at ``path`` or let the main process write it (atomically) while the others wait."""
    settings = {"count": len(prompts), "steps": steps, "guidance_scale": guidance_scale, "seed": seed}
    if accelerator.is_main_process and not path.is_file():
        with adapters_disabled(teacher.model, lora_student):
            latents, noise = generate_teacher_latents(teacher, prompts, steps, guidance_scale, seed,
                                                      show_progress=accelerator.is_local_main_process)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({"latents": latents.contiguous(), "noise": noise.contiguous()}, str(tmp), metadata={"settings": json.dumps(settings)})
        tmp.rename(path)
    accelerator.wait_for_everyone()
    with safe_open(str(path), framework="pt") as handle:
        stored = json.loads(handle.metadata().get("settings", "{}"))
    if stored != settings:
        raise ConfigError(f"synthetic latent cache {str(path)!r} was made with {stored}, not {settings}; "
                          "use another output_dir or delete the cache")
    tensors = load_file(str(path))
    return tensors["latents"], tensors["noise"]
