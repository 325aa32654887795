"""A full-size SD1.5-architecture pipeline with random weights, for step-time and memory measurements.

Nothing can be downloaded on these machines, but a training step's time and memory depend on the network's
shapes, not on its weights. So the GPU checks build SD1.5's published architecture offline: the UNet
(860M parameters, 64x64x4 latents), the CLIP ViT-L/14 text encoder (123M) and the KL-f8 VAE (84M), with
the testbed's caption tokenizer padded to CLIP's 77 tokens. Its images are noise; only its speed is real.
``--tiny_decoder_dir`` also writes a random-weight ``AutoencoderTiny`` of TAESD's architecture (diffusers'
defaults), the tiny decoder many users pair with few-step SD1.5 students, to time sampling with it.

    python -m stepdistill.testbed.full_size --output_dir runs/sd15_random --dtype fp16 --tiny_decoder_dir runs/taesd_random
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepdistill.errors import ConfigError, cli_errors
from stepdistill.methods.export import replace_folder
from stepdistill.teacher import WEIGHT_DTYPES
from stepdistill.testbed.tiny_models import sd15_scheduler

CLIP_CONTEXT = 77  # tokens per prompt in SD1.5's text encoder
CLIP_VOCAB = 49408  # kept so that the embedding table has its real size


def sd15_unet() -> UNet2DConditionModel:
    """SD1.5's UNet: four resolution levels of 320-1280 channels, cross-attention on 768-wide text tokens."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sd15_vae() -> AutoencoderKL:
    """SD1.5's KL-f8 autoencoder: 512x512x3 images <-> 64x64x4 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )


def sd15_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (12 layers, width 768), frozen as in every SD trainer."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=CLIP_CONTEXT, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def caption_tokenizer_77() -> CLIPTokenizer:
    """The testbed's caption tokenizer (CLIP's class and BPE format) at CLIP's context length."""
    from stepdistill.data.emoji32 import load_emoji32
    from stepdistill.testbed.tokenizer import write_caption_tokenizer

    with tempfile.TemporaryDirectory() as folder:  # the tokenizer holds its vocabulary in memory once loaded
        return write_caption_tokenizer(load_emoji32().captions, folder, max_length=CLIP_CONTEXT)


def build_sd15_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The whole pipeline with seeded random weights and SD1.5's DDIM training schedule."""
    torch.manual_seed(seed)
    tokenizer = caption_tokenizer_77()
    return StableDiffusionPipeline(
        vae=sd15_vae(), text_encoder=sd15_text_encoder(tokenizer), tokenizer=tokenizer, unet=sd15_unet(),
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)


def _check_new_folder(option: str, out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{option}={str(out)!r} already exists and is not an empty folder; give a new one")


def _save_whole(model: StableDiffusionPipeline | AutoencoderTiny, out: Path, dtype: str) -> None:
    """``save_pretrained`` (safetensors) through the exports' temporary-sibling swap: the folder appears only
    once complete."""
    replace_folder(out, lambda tmp: model.to(WEIGHT_DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True),
                   kept="nothing was written there: free some space, then run the command again")


def _check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not known; allowed: {', '.join(WEIGHT_DTYPES)}")


def save_sd15_random_pipeline(output_dir: str | Path, dtype: str = "fp16", seed: int = 0) -> Path:
    """Write the pipeline with ``save_pretrained``; an existing non-empty folder is refused."""
    _check_dtype(dtype)
    out = Path(output_dir)
    _check_new_folder("output_dir", out)
    _save_whole(build_sd15_random_pipeline(seed), out, dtype)
    return out


def save_tiny_decoder(output_dir: str | Path, dtype: str = "fp16", seed: int = 0) -> Path:
    """Write a random-weight ``AutoencoderTiny`` with diffusers' defaults, which are TAESD's architecture."""
    _check_dtype(dtype)
    out = Path(output_dir)
    _check_new_folder("tiny_decoder_dir", out)
    torch.manual_seed(seed)
    _save_whole(AutoencoderTiny(), out, dtype)
    return out


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", help="a new folder for the pipeline")
    parser.add_argument("--tiny_decoder_dir", help="a new folder for a random-weight TAESD-architecture AutoencoderTiny")
    parser.add_argument("--dtype", default="fp16", help="weights on disk: fp16 (2.1 GB), bf16 or fp32 (4.3 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.output_dir or args.tiny_decoder_dir):
        raise ConfigError("nothing to write: give --output_dir (the pipeline), --tiny_decoder_dir (the decoder) or both")
    for option in ("output_dir", "tiny_decoder_dir"):  # every refusal before the minutes of building
        if getattr(args, option):
            _check_new_folder(option, Path(getattr(args, option)))
    _check_dtype(args.dtype)
    if args.output_dir:
        print(f"saved a random-weight SD1.5-architecture pipeline to {save_sd15_random_pipeline(args.output_dir, args.dtype, args.seed)}")
    if args.tiny_decoder_dir:
        print(f"saved a random-weight TAESD-architecture AutoencoderTiny to {save_tiny_decoder(args.tiny_decoder_dir, args.dtype, args.seed)}")


if __name__ == "__main__":
    sys.exit(main())
