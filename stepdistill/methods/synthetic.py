"""Teacher-generated training latents (LADD's synthetic data), generated once, each process its share, and
cached on disk.

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
                             batch: int = 64, show_progress: bool = True, share: tuple[int, int] = (0, 1),
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, noise): the teacher's deterministic ``steps``-step guided samples of the prompts at positions
    ``rank`` modulo ``world`` (``share``; default all), from the noise every position gets whatever the share."""
    rank, world = share
    noise = initial_noise(teacher, len(prompts), seed)[rank::world]
    mine = prompts[rank::world]
    out = []
    for start in tqdm(range(0, len(mine), batch), desc="teacher latents", disable=not show_progress):
        out.append(sample_latents(teacher, mine[start:start + batch], steps, guidance_scale, noise[start:start + batch]).cpu())
    return (torch.cat(out) if out else noise[:0].clone()), noise


def _save(tensors: dict[str, torch.Tensor], path: Path, settings: dict) -> None:
    """Write under a temporary name and rename, so a kill never leaves a file that looks complete."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"settings": json.dumps(settings)})
    tmp.rename(path)


def _join_shares(path: Path, world: int, count: int, settings: dict) -> None:
    """The main process puts every process's share back in prompt order and deletes the shares."""
    parts = [path.with_name(f".{path.name}.part-{rank}-of-{world}") for rank in range(world)]
    shares = [load_file(str(part)) for part in parts]
    joined = {}
    for name in ("latents", "noise"):
        first = shares[0][name]
        joined[name] = torch.empty(count, *first.shape[1:], dtype=first.dtype)
        for rank, share in enumerate(shares):
            joined[name][rank::world] = share[name]
    _save(joined, path, settings)
    for part in parts:
        part.unlink()


def cached_teacher_latents(path: Path, teacher: TeacherWrapper, prompts: list[str], steps: int, guidance_scale: float,
                           seed: int, accelerator: Accelerator, lora_student: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the cache at ``path``, or make it first: every process samples its share of the prompts (every
    Nth), so N GPUs take 1/N of the time and no process waits out the whole generation at a barrier."""
    settings = {"count": len(prompts), "steps": steps, "guidance_scale": guidance_scale, "seed": seed}
    if not path.is_file():  # every process sees the same answer: the file is only written after the next barrier
        rank, world = accelerator.process_index, accelerator.num_processes
        with adapters_disabled(teacher.model, lora_student):
            latents, noise = generate_teacher_latents(teacher, prompts, steps, guidance_scale, seed, share=(rank, world),
                                                      show_progress=accelerator.is_local_main_process)
        share_path = path if world == 1 else path.with_name(f".{path.name}.part-{rank}-of-{world}")
        _save({"latents": latents, "noise": noise}, share_path, settings)
        accelerator.wait_for_everyone()
        if world > 1 and accelerator.is_main_process:
            _join_shares(path, world, len(prompts), settings)
    accelerator.wait_for_everyone()
    with safe_open(str(path), framework="pt") as handle:
        stored = json.loads(handle.metadata().get("settings", "{}"))
    if stored != settings:
        raise ConfigError(f"synthetic latent cache {str(path)!r} was made with {stored}, not {settings}; "
                          "use another output_dir or delete the cache")
    tensors = load_file(str(path))
    return tensors["latents"], tensors["noise"]
