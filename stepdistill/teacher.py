"""The one teacher wrapper every solver, loss, trainer and discriminator talks to.

It hides four differences between diffusers pipelines: the network (UNet or DiT transformer), what the
network predicts (epsilon, v, sample or flow velocity), how timesteps map to noise levels, and how prompts
become embeddings. Outputs are always returned as a :class:`Prediction` holding x0 and eps, from which
any other parameterisation follows (Salimans & Ho 2022, eq. 3-4 for v; Lipman et al. 2023 for flow).
"""
from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxPipeline

from stepdistill.errors import ModelError
from stepdistill.prompt_cache import PromptCache
from stepdistill.schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "PixArtSigmaPipeline", "FluxPipeline", "LatentConsistencyModelPipeline")
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # names options take
T5_TOKENS_WARNING = 64  # fewer T5 tokens than this per prompt is almost surely the testbed's default left in place


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: token states (B, L, D); for SD3 and SDXL pooled embeddings (B, P); for
    PixArt the T5 attention mask (B, L) that marks the prompt's tokens among the padding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, rows: Any) -> PromptEmbeds:
        """A subset (or reordering) of the batch rows."""
        take = lambda t: None if t is None else t[rows]  # noqa: E731
        return PromptEmbeds(self.hidden[rows], take(self.pooled), take(self.mask))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """On ``device``; ``dtype`` applies to the embeddings, never to the mask."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return PromptEmbeds(move(self.hidden), move(self.pooled), None if self.mask is None else self.mask.to(device))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        join = lambda name: None if getattr(items[0], name) is None else torch.cat([getattr(i, name) for i in items])  # noqa: E731
        return PromptEmbeds(torch.cat([i.hidden for i in items]), join("pooled"), join("mask"))

    def where(self, mask: torch.Tensor, other: PromptEmbeds) -> PromptEmbeds:
        """Rows of ``other`` where ``mask`` (B,) is true, else own rows (e.g. caption dropout)."""
        pick = lambda a, b: None if a is None else torch.where(mask.view(-1, *[1] * (a.dim() - 1)), b.to(a), a)  # noqa: E731
        return PromptEmbeds(pick(self.hidden, other.hidden), pick(self.pooled, other.pooled), pick(self.mask, other.mask))

    def expand(self, batch: int) -> PromptEmbeds:
        """Repeat a single-row embedding (e.g. the empty prompt) to ``batch`` rows."""
        return self.index([0] * batch)


@dataclass
class Prediction:
    """A denoiser output in its two canonical forms, at the noisy input's (alpha, sigma)."""

    x0: torch.Tensor
    eps: torch.Tensor

    def velocity(self) -> torch.Tensor:
        """Rectified-flow velocity d x_t / d sigma = eps - x0."""
        return self.eps - self.x0

    def v(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho v-target: alpha * eps - sigma * x0."""
        return _bcast(alpha, self.eps) * self.eps - _bcast(sigma, self.x0) * self.x0


def _bcast(scalar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) or () -> broadcastable to ``like`` (B, C, H, W)."""
    scalar = torch.as_tensor(scalar, device=like.device, dtype=like.dtype)
    return scalar.reshape(scalar.shape + (1,) * (like.dim() - scalar.dim()))


def output_to_prediction(output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                         prediction_type: str) -> Prediction:
    """Convert a raw network output at x_t = alpha x0 + sigma eps into (x0, eps)."""
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if prediction_type == "epsilon":
        return Prediction((x - s * output) / a, output)
    if prediction_type == "sample":
        return Prediction(output, (x - a * output) / s)
    if prediction_type == "v_prediction":  # valid for alpha^2 + sigma^2 = 1
        return Prediction(a * x - s * output, s * x + a * output)
    if prediction_type == "flow":  # output = eps - x0 with alpha = 1 - sigma
        return Prediction(x - s * output, x + a * output)
    raise ModelError(f"prediction type {prediction_type!r} is not known; allowed: {', '.join(PREDICTION_TYPES)}")


def prediction_to_output(pred: Prediction, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The raw output a network of ``prediction_type`` would have to produce for ``pred``."""
    if prediction_type == "epsilon":
        return pred.eps
    if prediction_type == "sample":
        return pred.x0
    if prediction_type == "v_prediction":
        return pred.v(alpha, sigma)
    if prediction_type == "flow":
        return pred.velocity()
    raise ModelError(f"prediction type {prediction_type!r} is not known; allowed: {', '.join(PREDICTION_TYPES)}")


def _call_unet(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, **extra: Any) -> torch.Tensor:
    return model(x, t, encoder_hidden_states=embeds.hidden, return_dict=False, **extra)[0]


def _call_sd3_transformer(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, **extra: Any) -> torch.Tensor:
    return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled,
                 return_dict=False, **extra)[0]


def _call_sdxl_unet(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                    pixels_per_latent: int = 8, **extra: Any) -> torch.Tensor:
    """SDXL's UNet also takes the pooled text embedding and six size numbers (Podell et al. 2023, sec. 2.2):
    original size, crop corner and target size. The pipeline's defaults, used here too, are the image size
    and no crop, so they follow from the latent's shape."""
    height, width = x.shape[-2] * pixels_per_latent, x.shape[-1] * pixels_per_latent
    time_ids = torch.tensor([height, width, 0, 0, height, width], device=x.device, dtype=x.dtype).expand(x.shape[0], 6)
    added = {"text_embeds": embeds.pooled, "time_ids": time_ids}
    return model(x, t, encoder_hidden_states=embeds.hidden, added_cond_kwargs=added, return_dict=False, **extra)[0]


def _call_pixart_transformer(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                             **extra: Any) -> torch.Tensor:
    """PixArt reads T5 tokens through their attention mask; a learned-sigma model also outputs a variance,
    whose channels the pipeline drops, and so does this (Chen et al. 2023, PixArt-alpha)."""
    added = {"resolution": None, "aspect_ratio": None}
    out = model(x, encoder_hidden_states=embeds.hidden, encoder_attention_mask=embeds.mask, timestep=t,
                added_cond_kwargs=added, return_dict=False, **extra)[0]
    return out[:, :x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _call_flux_transformer(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                           **extra: Any) -> torch.Tensor:
    """Flux reads its latents as a sequence of 2x2 patches with rotary (0, row, column) ids, its prompt tokens
    with all-zero ids, and timesteps as noise levels in [0, 1]. The patches are packed and unpacked with
    FluxPipeline's own helpers, so the wrapper keeps image-shaped latents like every other denoiser."""
    batch, channels, height, width = x.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    text_ids = torch.zeros(embeds.hidden.shape[1], 3, device=x.device, dtype=x.dtype)
    out = model(hidden_states=FluxPipeline._pack_latents(x, batch, channels, height, width),
                encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled, timestep=t / 1000,
                img_ids=image_ids, txt_ids=text_ids, return_dict=False, **extra)[0]
    return FluxPipeline._unpack_latents(out, height, width, vae_scale_factor=1)


DENOISER_CALLS = {"UNet2DConditionModel": _call_unet, "SD3Transformer2DModel": _call_sd3_transformer,
                  "PixArtTransformer2DModel": _call_pixart_transformer, "FluxTransformer2DModel": _call_flux_transformer}


def pipeline_guidance(pipe: DiffusionPipeline, guidance_scale: float) -> dict[str, Any]:
    """A pipeline call's arguments for the guidance :meth:`TeacherWrapper.predict` applies at ``guidance_scale``:
    two-pass classifier-free guidance with the empty prompt as the unconditional one, or for a guidance-
    distilled Flux the scale its guidance embedding reads. A Flux pipeline guides in two passes only given
    ``true_cfg_scale`` and a negative prompt; its ``guidance_scale`` feeds the embedding."""
    if type(pipe).__name__ == "FluxPipeline" and not pipe.transformer.config.get("guidance_embeds", False):
        return {"true_cfg_scale": guidance_scale, "negative_prompt": ""} if guidance_scale > 1 else {}
    return {"guidance_scale": guidance_scale}


def guidance_passes(pipe: DiffusionPipeline, guidance_scale: float) -> int:
    """Network passes per step of a call guided at ``guidance_scale``: 2 with classifier-free guidance (the
    unconditional pass), 1 without it or when the network reads the scale as an input (a w-embedding UNet,
    a guidance-distilled Flux)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    reads_scale = (getattr(denoiser.config, "time_cond_proj_dim", None) is not None
                   or bool(getattr(denoiser.config, "guidance_embeds", False)))
    return 2 if guidance_scale > 1 and not reads_scale else 1


def pipeline_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> dict[str, Any]:
    """A pipeline call's arguments for image-shaped initial ``latents`` (B, C, h, w): Flux pipelines take them
    packed into 2x2 patches, with the image size given, since packed latents do not carry it."""
    if type(pipe).__name__ != "FluxPipeline":
        return {"latents": latents}
    batch, channels, height, width = latents.shape
    return {"latents": pipe._pack_latents(latents, batch, channels, height, width),
            "height": height * pipe.vae_scale_factor, "width": width * pipe.vae_scale_factor}


class TeacherWrapper:
    """A diffusers denoiser plus its schedule, prediction type and prompt encoder, behind one interface.

    ``with_model`` gives a wrapper of the same kind around another network (a student, a LoRA-wrapped or
    DDP-wrapped copy), so students are called through exactly the same conversions as the teacher.
    """

    def __init__(self, pipe: DiffusionPipeline, model: torch.nn.Module | None = None, prediction_type: str | None = None,
                 max_sequence_length: int = 256):
        name = type(pipe).__name__
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if name not in SUPPORTED_PIPELINES or denoiser is None or type(denoiser).__name__ not in DENOISER_CALLS:
            raise ModelError(f"pipeline class {name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")
        self.pipe = pipe
        self.model = model if model is not None else denoiser
        self.denoiser_class = type(denoiser).__name__
        self.is_sdxl = name == "StableDiffusionXLPipeline"
        self.is_pixart = name == "PixArtSigmaPipeline"
        self.is_flux = name == "FluxPipeline"
        # guidance-distilled Flux (FLUX.1-dev) takes the guidance scale as an input and is guided in one pass
        self.embedded_guidance = self.is_flux and bool(denoiser.config.get("guidance_embeds", False))
        self._call = (functools.partial(_call_sdxl_unet, pixels_per_latent=pipe.vae_scale_factor) if self.is_sdxl
                      else DENOISER_CALLS[self.denoiser_class])
        # Flux pipelines sample from uniform sigmas, shifted by an amount that depends on the image's token count
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler, image_seq_len=self._image_tokens(),
                                                     uniform_sigmas=self.is_flux)
        self.prediction_type = prediction_type or self._infer_prediction_type()
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"prediction type {self.prediction_type!r} is not known; allowed: {', '.join(PREDICTION_TYPES)}")
        self.max_sequence_length = max_sequence_length
        t5 = {"PixArtSigmaPipeline": pipe.text_encoder, "FluxPipeline": getattr(pipe, "text_encoder_2", None)}.get(
            name, getattr(pipe, "text_encoder_3", None))
        if t5 is not None and max_sequence_length < T5_TOKENS_WARNING:
            warnings.warn(f"max_sequence_length={max_sequence_length} cuts every prompt to that many T5 tokens; the "
                          "pipelines use 256 (SD3), 300 (PixArt-Sigma) or 512 (Flux): pass --max_sequence_length; "
                          "the testbed DiT without T5 uses 8", stacklevel=2)
        self.prompt_cache = PromptCache()

    @property
    def latent_size(self) -> int:
        """Height (= width) of the denoiser's latents at the VAE's native resolution."""
        config = getattr(self.pipe, self.denoiser_name).config
        if config.get("sample_size") is not None:
            return config.sample_size
        return self.pipe.vae.config.sample_size // self.pipe.vae_scale_factor  # Flux's config has no sample size

    @property
    def latent_channels(self) -> int:
        """Channels of the image-shaped latents the wrapper takes (Flux's network reads them packed, 4x as many)."""
        config = getattr(self.pipe, self.denoiser_name).config
        return config.in_channels // 4 if self.is_flux else config.in_channels

    def _image_tokens(self) -> int | None:
        """Flux: the packed latent's token count, which sets its scheduler's dynamic shift; else None."""
        return (self.latent_size // 2) ** 2 if self.is_flux else None

    def _infer_prediction_type(self) -> str:
        if self.schedule.kind == "flow":
            return "flow"
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def is_dit(self) -> bool:
        return self.denoiser_class != "UNet2DConditionModel"

    @property
    def denoiser_name(self) -> str:
        """The pipeline attribute (and folder) holding the denoiser: ``transformer`` for DiTs, else ``unet``."""
        return "transformer" if self.is_dit else "unet"

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        """What a call of this pipeline needs beyond prompt, steps and guidance to sample as the wrapper does:
        the T5 token count of SD3 and PixArt, and for PixArt no resolution binning (the latents set the size)."""
        if self.is_pixart:
            return {"max_sequence_length": self.max_sequence_length, "use_resolution_binning": False}
        return {"max_sequence_length": self.max_sequence_length} if self.is_dit else {}

    def with_model(self, model: torch.nn.Module, prediction_type: str | None = None) -> TeacherWrapper:
        """Same schedule, prompts and conversions around another network (e.g. the student)."""
        other = copy.copy(self)
        other.model = model
        other.prediction_type = prediction_type or self.prediction_type
        return other

    # --- prompts -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Prompt embeddings through the byte-bounded cache (``prompt_cache``), on the model's device."""
        device = next(self.model.parameters()).device
        return PromptEmbeds.cat(self.prompt_cache.lookup(prompts, self.encode_uncached)).to(device)

    def encode_uncached(self, prompts: list[str]) -> list[PromptEmbeds]:
        """One text-encoder call for ``prompts`` (no cache): what a pipeline call pays for its prompts."""
        device = self.pipe.text_encoder.device
        pooled = mask = None
        if self.is_pixart:
            hidden, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                         clean_caption=False, max_sequence_length=self.max_sequence_length)
        elif self.is_flux:
            hidden, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=device,
                                                        max_sequence_length=self.max_sequence_length)
        elif self.is_dit:
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, None, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        elif self.is_sdxl:
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            if self.pipe.config.get("force_zeros_for_empty_prompt", False):  # the pipeline's own unconditional input
                empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
                hidden, pooled = hidden * ~empty.view(-1, 1, 1), pooled * ~empty.view(-1, 1)
        else:
            hidden, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        batch = PromptEmbeds(hidden.float().cpu(), None if pooled is None else pooled.float().cpu(),
                             None if mask is None else mask.cpu())
        return [batch.index([i]) for i in range(len(prompts))]

    def empty_prompt(self, batch: int) -> PromptEmbeds:
        """The unconditional embedding repeated ``batch`` times (cached after the first call)."""
        return self.encode_prompts([""]).expand(batch)

    # --- denoising -----------------------------------------------------------------------------------------
    def raw_output(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, **extra: Any) -> torch.Tensor:
        """One network call; ``t`` is the model timestep (per sample or scalar)."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        model_dtype = next(self.model.parameters()).dtype
        if self.embedded_guidance and "guidance" not in extra:  # unguided: the embedding reads scale 1
            extra = {**extra, "guidance": torch.ones(x.shape[0], device=x.device)}
        out = self._call(self.model, x.to(model_dtype), t, embeds.to(x.device, model_dtype), **extra)
        return out.float()

    def features(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, **extra: Any) -> list[torch.Tensor]:
        """Intermediate feature maps (B, C, h, w) of the denoiser at x_t: the frozen feature network of the
        adversarial discriminator (Sauer et al. 2024). Gradients flow back to ``x`` when it needs them."""
        found: list[Any] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out)) for m in feature_modules(self.model)]
        try:
            self.raw_output(x, t, embeds, **extra)
        finally:
            for hook in hooks:
                hook.remove()
        return [_as_feature_map(f, x.shape[-2], x.shape[-1]).float() for f in found]

    def predict(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float | torch.Tensor = 1.0,
                uncond: PromptEmbeds | None = None, batched_guidance: bool = True, **extra: Any) -> Prediction:
        """Denoise x_t; with guidance != 1, conditional and unconditional passes run as one batched forward
        (``batched_guidance=False``: one after the other, half the activation memory at once).

        Guidance is applied to the raw output, which equals applying it to x0 or eps since the conversions
        are affine in the output for a fixed x_t. ``guidance_scale`` may be per sample (LCM's w range).
        A guidance-distilled Flux reads the scale through its guidance embedding instead, in one pass.
        """
        x = x.float()
        t = torch.as_tensor(t, device=x.device)
        alpha, sigma = self.schedule.alpha_sigma(t)
        if self.embedded_guidance:  # one pass: the scale is an input of the network
            scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device).expand(x.shape[0])
            out = self.raw_output(x, t, embeds, guidance=scale, **extra)
        elif isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:  # decided on the host: no device read
            out = self.raw_output(x, t, embeds, **extra)
        else:
            uncond = uncond if uncond is not None else self.empty_prompt(x.shape[0])
            if batched_guidance:
                t2 = torch.cat([t.expand(x.shape[0])] * 2) if t.dim() == 0 else torch.cat([t, t])
                both = self.raw_output(torch.cat([x, x]), t2, PromptEmbeds.cat([uncond.to(x.device), embeds]), **_double(extra))
                out_u, out_c = both.chunk(2)
            else:
                out_u, out_c = self.raw_output(x, t, uncond.to(x.device), **extra), self.raw_output(x, t, embeds, **extra)
            w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device)
            out = out_u + _bcast(w, out_c) * (out_c - out_u)
        return output_to_prediction(out, x, alpha.to(x.device), sigma.to(x.device), self.prediction_type)


def feature_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Blocks whose outputs serve as discriminator features: a UNet's down, mid and up blocks, a DiT's
    transformer blocks (image tokens)."""
    if hasattr(model, "down_blocks"):
        return [*model.down_blocks, model.mid_block, *model.up_blocks]
    if hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks)
    raise ModelError(f"denoiser {type(model).__name__!r} has no known feature blocks; supported: "
                     f"{', '.join(DENOISER_CALLS)}")


def _as_feature_map(output: Any, height: int, width: int) -> torch.Tensor:
    """A block output as (B, C, h, w): UNet down blocks return (hidden, skips); DiT blocks return
    (text tokens, image tokens) with image tokens (B, N, D) laid out row-major on the patch grid."""
    if isinstance(output, tuple):
        output = output[0] if output[0] is not None and output[0].dim() == 4 else output[-1]
    if output.dim() == 3:
        batch, tokens, dim = output.shape
        side = int(round((tokens * height / width) ** 0.5))
        output = output.transpose(1, 2).reshape(batch, dim, side, tokens // side)
    return output


def _double(extra: dict[str, Any]) -> dict[str, Any]:
    """Repeat batched extra network inputs for the two halves of a CFG forward."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in extra.items()}


def load_teacher(path: str | Path, pipeline_class: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                 max_sequence_length: int | None = None) -> TeacherWrapper:
    """Load a diffusers pipeline folder (offline, safetensors only) and wrap it; clear errors for bad input."""
    import diffusers

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"teacher {str(path)!r} is not a diffusers pipeline folder (no model_index.json); "
                         "give a folder written by save_pretrained, e.g. the shipped testbed teacher")
    if pipeline_class is not None and pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelError(f"pipeline class {pipeline_class!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")
    cls = getattr(diffusers, pipeline_class) if pipeline_class else DiffusionPipeline
    # diffusers wants the components a folder was saved without (an SD3 teacher without T5, say) passed as None
    absent = {name: None for name in _absent_components(folder)}
    pipe = cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    return TeacherWrapper(pipe, prediction_type=prediction_type, **kwargs)


def _absent_components(folder: Path) -> list[str]:
    """Components that ``model_index.json`` lists as saved without a class (``[null, null]``)."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    return [name for name, value in index.items() if isinstance(value, list) and all(v is None for v in value)]
