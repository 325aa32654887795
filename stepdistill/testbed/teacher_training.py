"""Training methods for the testbed teachers, run by the shared loop.

Stage 1 trains the tiny ``AutoencoderKL`` on the images. Stage 2 trains the denoiser in that VAE's
latent space: an SD1.5-style epsilon UNet on the DDPM scaled-linear schedule, or an SD3-style MMDiT with
the rectified-flow objective (x_t = (1 - s) x0 + s eps, target eps - x0, logit-normal s; Esser et al. 2024).
Captions are dropped 10% of the time so the teacher supports classifier-free guidance.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import (AutoencoderKL, FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from diffusers.training_utils import EMAModel
from transformers import CLIPTokenizer

from stepdistill.data.emoji32 import ImageCaptionSet
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.teacher import Prediction, TeacherWrapper, prediction_to_output
from stepdistill.testbed import tiny_models
from stepdistill.training.step_random import StepRandom
from stepdistill.utils.images import save_grid

VALIDATION_PROMPTS = ["grinning face", "hamster face", "red apple", "rocket", "sun", "fire", "snowman", "banana"]


class VaeMethod:
    """Reconstruction + small KL: the SD recipe without the perceptual/GAN terms (no LPIPS weights offline)."""

    name = "testbed-vae"
    export_name = "vae"

    def __init__(self, data: ImageCaptionSet, kl_weight: float = 1e-6, seed: int = 0):
        torch.manual_seed(seed)
        self.vae = tiny_models.tiny_vae()
        self.pixels = data.pixel_tensor()
        self.kl_weight = kl_weight

    def trainable_module(self) -> torch.nn.Module:
        return self.vae

    def num_items(self) -> int:
        return len(self.pixels)

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        return {"pixels": self.pixels[indices].to(device)}

    def compute_loss(self, model, batch, rand: StepRandom):
        posterior = model.encode(batch["pixels"]).latent_dist
        latents = posterior.mean + posterior.std * rand.randn(*posterior.mean.shape[1:])
        recon = model.decode(latents).sample
        mse = F.mse_loss(recon.float(), batch["pixels"])
        kl = posterior.kl().mean()
        return mse + self.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}

    def after_optimizer_step(self, model) -> None:
        pass

    def checkpoint_objects(self) -> list[Any]:
        return []

    @torch.no_grad()
    def validate(self, model, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        model.eval()
        x = self.pixels[:16].to(accelerator.device)
        recon = model.decode(model.encode(x).latent_dist.mode()).sample
        save_grid(torch.cat([x, recon]).cpu(), out_dir / f"recon-{step:06d}.png", nrow=16)

    def export(self, model, out_dir: Path) -> None:
        """Save the VAE with latent statistics: SD uses 1/std, SD3 additionally a mean shift."""
        model.eval()
        with torch.no_grad():
            latents = torch.cat([model.encode(chunk).latent_dist.mode() for chunk in self.pixels.split(256)])
        model.register_to_config(scaling_factor=float(1.0 / latents.std()), shift_factor=float(latents.mean()))
        model.save_pretrained(out_dir)


class DenoiserMethod:
    """Train the UNet (kind='sd') or MMDiT (kind='sd3') teacher on cached latents and prompt embeddings."""

    export_name = "pipeline"

    def __init__(self, kind: str, data: ImageCaptionSet, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 caption_dropout: float = 0.1, ema_decay: float = 0.999, seed: int = 0):
        self.kind, self.name = kind, f"testbed-teacher-{kind}"
        self.caption_dropout = caption_dropout
        torch.manual_seed(seed)
        self.pipe = build_pipeline(kind, vae, tokenizer)
        self.denoiser = self.pipe.unet if kind == "sd" else self.pipe.transformer
        self.denoiser.train().requires_grad_(True)
        self.ema = EMAModel(self.denoiser.parameters(), decay=ema_decay, model_cls=type(self.denoiser),
                            model_config=self.denoiser.config)
        self.wrapper = TeacherWrapper(self.pipe, max_sequence_length=TESTBED_SD3_MAX_SEQUENCE_LENGTH)
        self.data = LatentPromptData.from_images(self.wrapper, data)

    def trainable_module(self) -> torch.nn.Module:
        return self.denoiser

    def num_items(self) -> int:
        return len(self.data)

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        latents, embeds = self.data.batch(indices, device)
        return {"latents": latents, "embeds": embeds}

    def _timesteps(self, rand: StepRandom) -> torch.Tensor:
        """Uniform DDPM timesteps, or logit-normal(0, 1) flow sigmas as timesteps (SD3 paper, sec. 3.1)."""
        if self.kind == "sd":
            return rand.randint(0, self.wrapper.schedule.num_train_timesteps)
        return torch.sigmoid(rand.randn()) * self.wrapper.schedule.num_train_timesteps

    def compute_loss(self, model, batch, rand: StepRandom):
        x0, embeds = batch["latents"], batch["embeds"]
        noise = rand.randn(*x0.shape[1:])
        drop = rand.rand() < self.caption_dropout  # caption dropout teaches the unconditional model for CFG
        embeds = embeds.where(drop, self.wrapper.empty_prompt(len(x0)).to(x0.device))
        t = self._timesteps(rand)
        alpha, sigma = self.wrapper.schedule.alpha_sigma(t)
        a, s = alpha.to(x0).view(-1, 1, 1, 1), sigma.to(x0).view(-1, 1, 1, 1)
        output = self.wrapper.with_model(model).raw_output(a * x0 + s * noise, t, embeds)
        target = prediction_to_output(Prediction(x0, noise), a, s, self.wrapper.prediction_type)
        return F.mse_loss(output, target), {}

    def after_optimizer_step(self, model) -> None:
        self.ema.step(model.parameters())

    def checkpoint_objects(self) -> list[Any]:
        return [self.ema]

    def _ema_pipeline(self, model) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
        ema_model = copy.deepcopy(model).eval()
        self.ema.copy_to(ema_model.parameters())
        pipe = copy.copy(self.pipe)
        pipe.register_modules(**{"unet" if self.kind == "sd" else "transformer": ema_model})
        return pipe

    @torch.no_grad()
    def validate(self, model, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        pipe = self._ema_pipeline(model)
        extra = {} if self.kind == "sd" else {"max_sequence_length": TESTBED_SD3_MAX_SEQUENCE_LENGTH}
        images = pipe(VALIDATION_PROMPTS, num_inference_steps=50, guidance_scale=4.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **extra).images
        save_grid(images * 2 - 1, out_dir / f"samples-{step:06d}.png", nrow=len(VALIDATION_PROMPTS))

    def export(self, model, out_dir: Path) -> None:
        """Save the EMA weights as a complete pipeline folder, in fp16 safetensors."""
        pipe = self._ema_pipeline(model)
        pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)


# SD3 pipelines append max_sequence_length all-zero "T5" tokens when text_encoder_3 is None (default 256).
# The testbed DiT is trained and sampled with a short zero block; pass this value to the pipeline call.
TESTBED_SD3_MAX_SEQUENCE_LENGTH = 8


def build_pipeline(kind: str, vae: AutoencoderKL, tokenizer: CLIPTokenizer):
    """An untrained testbed pipeline of the real diffusers class around a trained VAE."""
    pipe = _untrained_pipeline(kind, vae, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _untrained_pipeline(kind: str, vae: AutoencoderKL, tokenizer: CLIPTokenizer):
    if kind == "sdxl":  # tests only: two text encoders whose states are concatenated, the second one's pooled
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=tiny_models.tiny_clip_text(tokenizer, 64, seed=4), tokenizer=tokenizer,
            text_encoder_2=tiny_models.tiny_clip_text_with_projection(tokenizer, 64, seed=5), tokenizer_2=tokenizer,
            unet=tiny_models.tiny_sdxl_unet(128, pooled_dim=64), scheduler=tiny_models.sd15_scheduler(),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    if kind == "pixart":  # tests only: PixArt-Sigma, a DiT with T5 alone and the SD schedule's epsilon prediction
        t5_tokenizer = tiny_models.tiny_t5_tokenizer([token.removesuffix("</w>") for token in tokenizer.get_vocab()])
        return PixArtSigmaPipeline(
            tokenizer=t5_tokenizer, text_encoder=tiny_models.tiny_t5_encoder(t5_tokenizer, 128, seed=7), vae=vae,
            transformer=tiny_models.tiny_pixart_transformer(128), scheduler=tiny_models.sd15_scheduler())
    if kind in ("flux", "flux_dev"):  # tests only: Flux, CLIP's pooled embedding plus T5's tokens, packed latents
        t5_tokenizer = tiny_models.tiny_t5_tokenizer([token.removesuffix("</w>") for token in tokenizer.get_vocab()])
        vae = copy.deepcopy(vae)
        vae.register_to_config(shift_factor=0.1159)  # Flux's VAE shifts its latents, and its pipeline needs the value
        return FluxPipeline(
            scheduler=tiny_models.flux_scheduler(), vae=vae, text_encoder=tiny_models.tiny_clip_text(tokenizer, 64, seed=8),
            tokenizer=tokenizer, text_encoder_2=tiny_models.tiny_t5_encoder(t5_tokenizer, 128, seed=9),
            tokenizer_2=t5_tokenizer, transformer=tiny_models.tiny_flux_transformer(128, pooled_projection_dim=64,
                                                          guidance_embeds=kind == "flux_dev"))
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=tiny_models.tiny_clip_text(tokenizer, 128, seed=1), tokenizer=tokenizer,
            unet=tiny_models.tiny_unet(128), scheduler=tiny_models.sd15_scheduler(), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    t5 = {"text_encoder_3": None, "tokenizer_3": None}
    if kind == "sd3_t5":  # tests only: SD3 with its T5 encoder, from a word-level T5 tokenizer of the vocabulary
        t5_tokenizer = tiny_models.tiny_t5_tokenizer([token.removesuffix("</w>") for token in tokenizer.get_vocab()])
        t5 = {"text_encoder_3": tiny_models.tiny_t5_encoder(t5_tokenizer, 128, seed=6), "tokenizer_3": t5_tokenizer}
    return StableDiffusion3Pipeline(
        transformer=tiny_models.tiny_sd3_transformer(joint_attention_dim=128, pooled_projection_dim=128),
        scheduler=tiny_models.sd3_scheduler(), vae=vae,
        text_encoder=tiny_models.tiny_clip_text_with_projection(tokenizer, 64, seed=2), tokenizer=tokenizer,
        text_encoder_2=tiny_models.tiny_clip_text_with_projection(tokenizer, 64, seed=3), tokenizer_2=tokenizer, **t5)
