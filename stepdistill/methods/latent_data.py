"""Training pairs (scaled VAE latent, caption): the dataset is encoded once, chunk by chunk as it is read, so
only latents are kept; optionally into an on-disk cache that every process reads memory-mapped."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from stepdistill.data.emoji32 import ImageCaptionSet
from stepdistill.errors import ConfigError
from stepdistill.prompt_cache import DEFAULT_PROMPT_CACHE_MB
from stepdistill.teacher import PromptEmbeds, TeacherWrapper

ENCODE_PIXEL_BUDGET = 64 * 64 * 64  # pixels per VAE encode call: 64 testbed images, one at 512 px


@dataclass
class DataOptions:
    """Where the training images and captions come from, and how much of them is kept in memory."""

    dataset: str | None = None  # emoji32 (default), image folder with metadata.jsonl, webdataset shards or .npz
    resolution: int = 32  # training image size (must match the teacher VAE's sample_size)
    caption_column: str = "text"  # image folders: the metadata.jsonl field holding each caption
    latent_cache_dir: str | None = None  # encode the dataset once into this folder (each process its share) and read it memory-mapped; reused while dataset, resolution and VAE are unchanged (none: encode in memory at every start)
    prompt_cache_mb: int = DEFAULT_PROMPT_CACHE_MB  # host memory per process for prompt embeddings; beyond it the least recently used are encoded again when next needed

    def validate_data(self) -> None:
        if self.latent_cache_dir and Path(self.latent_cache_dir).exists() and not Path(self.latent_cache_dir).is_dir():
            raise ConfigError(f"latent_cache_dir '{self.latent_cache_dir}' is a file; expected a folder (made if missing)")
        if self.prompt_cache_mb < 0:
            raise ConfigError(f"prompt_cache_mb={self.prompt_cache_mb} must be 0 (cache only the empty prompt) or more")


class LatentRows(Protocol):
    """Latents indexable by a list of sample indices: an in-memory tensor or a memory-mapped cache."""

    def __len__(self) -> int: ...
    def __getitem__(self, indices: list[int]) -> torch.Tensor: ...


class LatentPromptData:
    """Training pairs as (scaled VAE latent, caption); prompts go through the teacher's prompt cache."""

    def __init__(self, teacher: TeacherWrapper, latents: LatentRows, captions: list[str]):
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents for {len(captions)} captions")
        self.teacher, self.latents, self.captions = teacher, latents, captions

    @classmethod
    def from_images(cls, teacher: TeacherWrapper, data: ImageCaptionSet, batch: int | None = None) -> LatentPromptData:
        """Encode an in-memory set (the testbed's, or one loaded with ``load_dataset``)."""
        return cls(teacher, encode_images(teacher, data.pixel_tensor(), batch), list(data.captions))

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: list[int], device: torch.device) -> tuple[torch.Tensor, PromptEmbeds]:
        return self.latents[indices].to(device), self.teacher.encode_prompts([self.captions[i] for i in indices]).to(device)


def encode_batch_size(resolution: int) -> int:
    """Images per VAE encode call: fewer as they grow (64 images of 512 px would take tens of GB of activations)."""
    return max(1, min(64, ENCODE_PIXEL_BUDGET // (resolution * resolution)))


def check_resolution(teacher: TeacherWrapper, resolution: int) -> None:
    """Refuse images the teacher's VAE was not built for, before any is read."""
    expected = teacher.pipe.vae.config.sample_size
    if resolution != expected:
        raise ConfigError(f"dataset resolution {resolution} does not match the teacher VAE's sample_size {expected}; "
                          f"pass --resolution {expected}")


@torch.no_grad()
def encode_images(teacher: TeacherWrapper, pixels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Posterior means in the pipeline's latent space (SD3 and Flux: shifted, then scaled), in chunks."""
    check_resolution(teacher, pixels.shape[-1])
    vae = teacher.pipe.vae
    out = []
    for chunk in pixels.split(batch or encode_batch_size(pixels.shape[-1])):
        latents = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mode().float()
        if teacher.schedule.kind == "flow" and vae.config.get("shift_factor") is not None:
            latents = latents - vae.config.shift_factor
        out.append((latents * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def _chunks(samples: Iterable[tuple[int, np.ndarray, str]], size: int) -> Iterator[list[tuple[int, np.ndarray, str]]]:
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_samples(teacher: TeacherWrapper, samples: Iterable[tuple[int, np.ndarray, str]], resolution: int,
                   show_progress: bool = True) -> tuple[list[int], torch.Tensor, list[str]]:
    """(positions, latents, captions) of decoded samples, encoded one chunk at a time as they are read, so a
    set far larger than memory costs only its latents."""
    check_resolution(teacher, resolution)
    positions, latents, captions = [], [], []
    with tqdm(desc="encoding dataset", unit="img", disable=not show_progress) as progress:
        for chunk in _chunks(samples, encode_batch_size(resolution)):
            pixels = torch.from_numpy(np.stack([pixels for _, pixels, _ in chunk])).permute(0, 3, 1, 2)
            latents.append(encode_images(teacher, pixels.float().div(127.5).sub(1.0), batch=len(chunk)))
            positions += [position for position, _, _ in chunk]
            captions += [caption for _, _, caption in chunk]
            progress.update(len(chunk))
    channels, size = teacher.latent_channels, resolution // teacher.pipe.vae_scale_factor
    return positions, torch.cat(latents) if latents else torch.empty(0, channels, size, size), captions
