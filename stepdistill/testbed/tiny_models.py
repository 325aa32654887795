"""Configs of the testbed's tiny teachers, built from the real diffusers / transformers classes.

The shapes mirror the production models at toy scale: 32x32 RGB images -> 8x8x4 latents, a few-million
parameter UNet (SD1.5 layout) or MMDiT (SD3 layout), small random CLIP text encoders that stay frozen.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

LATENT_CHANNELS = 4
LATENT_SIZE = 8


def tiny_vae() -> AutoencoderKL:
    """32x32x3 <-> 8x8x4 KL autoencoder (three blocks, two downsamplings)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_clip_text(tokenizer: CLIPTokenizer, hidden: int = 128, seed: int = 0) -> CLIPTextModel:
    """A randomly initialised, frozen CLIP text encoder: deterministic, distinct embeddings per caption."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config(tokenizer, hidden, hidden)).eval().requires_grad_(False)


def tiny_clip_text_with_projection(tokenizer: CLIPTokenizer, hidden: int, seed: int) -> CLIPTextModelWithProjection:
    """SD3 uses two CLIP encoders with projection heads; their pooled outputs are concatenated."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config(tokenizer, hidden, hidden)).eval().requires_grad_(False)


def tiny_t5_tokenizer(captions: list[str]) -> T5TokenizerFast:
    """A T5 tokenizer (sentencepiece-style unigram, one piece per caption word) built offline from the captions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({word for caption in captions for word in caption.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + word, -1.0) for word in words]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 128, seed: int = 0) -> T5EncoderModel:
    """SD3's third text encoder at toy scale; its width is the MMDiT's joint attention width, as in SD3."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval().requires_grad_(False)


def tiny_unet(cross_attention_dim: int = 128) -> UNet2DConditionModel:
    """SD1.5-layout UNet of about 6M parameters for 8x8x4 latents."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=32,
    )


def tiny_sdxl_unet(cross_attention_dim: int = 128, pooled_dim: int = 64, time_embed_dim: int = 8) -> UNet2DConditionModel:
    """SDXL-layout UNet for 8x8x4 latents: SD1.5's blocks plus SDXL's added conditioning, the pooled text
    embedding and six size numbers, each size number embedded in ``time_embed_dim`` channels."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    )


def tiny_pixart_transformer(caption_channels: int = 128) -> PixArtTransformer2DModel:
    """PixArt-Sigma-layout DiT for 8x8x4 latents: T5 tokens through cross-attention, adaLN-single timestep
    conditioning and a learned variance (eight output channels for four latent ones)."""
    return PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS,
        num_layers=4, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
        caption_channels=caption_channels, norm_type="ada_norm_single", use_additional_conditions=False,
    )


def tiny_sd3_transformer(joint_attention_dim: int = 128, pooled_projection_dim: int = 128) -> SD3Transformer2DModel:
    """SD3-layout MMDiT for 8x8x4 latents with one token per latent pixel."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=6, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=128, pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=16,
    )


def tiny_flux_transformer(joint_attention_dim: int = 128, pooled_projection_dim: int = 64,
                          guidance_embeds: bool = False) -> FluxTransformer2DModel:
    """Flux-layout DiT for 8x8x4 latents, which its pipeline packs into 4x4 tokens of 16 channels: double-stream
    blocks, then single-stream ones, rotary positions; FLUX.1-schnell's layout, or with a guidance embedding
    FLUX.1-dev's."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux's scheduler config: the shift follows the image's token count (``use_dynamic_shifting``, with
    diffusers' defaults, which are Flux's), so the static ``shift`` is unused."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def sd15_scheduler() -> DDIMScheduler:
    """SD1.5's training schedule (scaled-linear betas, 1000 steps, epsilon) with DDIM sampling."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler schedule; shift 1 because 8x8 latents need no high-resolution shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
