"""Decode with another autoencoder than the pipeline's own, as users deploy fast students.

Why: at one image per call the VAE decode is a fixed cost that both the 50-step teacher and a 4-step student
pay once, so it bounds the speed-up a student can show. SD1.5's KL-f8 decoder at 512 px costs about three
UNet passes; many users of few-step models therefore decode with a tiny autoencoder (diffusers'
``AutoencoderTiny``, the TAESD family). Timing teacher and students with the decoder one deploys, both alike,
is the honest comparison for that setting.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline

from stepdistill.errors import ModelError

DECODER_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def upsampling_factor(vae: AutoencoderKL | AutoencoderTiny) -> int:
    """Image pixels per latent pixel along one side."""
    config = vae.config
    if isinstance(vae, AutoencoderTiny):
        return config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
    return 2 ** (len(config.block_out_channels) - 1)


def decoder_class(folder: str | Path) -> type[AutoencoderKL] | type[AutoencoderTiny]:
    """The autoencoder class a ``save_pretrained`` folder holds, or a ModelError naming what is allowed."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"decoder folder {str(folder)!r} has no config.json; give an autoencoder saved with save_pretrained")
    name = json.loads(config_path.read_text()).get("_class_name")
    if name not in DECODER_CLASSES:
        raise ModelError(f"decoder folder {str(folder)!r} holds a {name}; allowed: {', '.join(DECODER_CLASSES)}")
    return DECODER_CLASSES[name]


def load_decoder(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKL | AutoencoderTiny:
    """An ``AutoencoderKL`` or ``AutoencoderTiny`` folder, from safetensors only."""
    return decoder_class(folder).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).to(device).eval()


def use_decoder(pipes: Iterable[DiffusionPipeline], vae: AutoencoderKL | AutoencoderTiny) -> None:
    """Give every pipeline ``vae`` (shared, inference only) once it is checked to read all their latents."""
    pipes = list(pipes)
    for pipe in pipes:
        channels = pipe.vae.config.latent_channels
        if vae.config.latent_channels != channels:
            raise ModelError(f"the decoder takes {vae.config.latent_channels} latent channels; "
                             f"the pipeline's latents have {channels}")
        if upsampling_factor(vae) != upsampling_factor(pipe.vae):
            raise ModelError(f"the decoder upsamples latents {upsampling_factor(vae)}x; the pipeline's own VAE "
                             f"{upsampling_factor(pipe.vae)}x, so its images would not be the pipeline's size")
    for pipe in pipes:
        pipe.vae = vae
