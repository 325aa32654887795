"""Pieces every distillation method shares: cached latents and prompts, LoRA students, validation grids."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from stepdistill.errors import ConfigError
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.teacher import WEIGHT_DTYPES, TeacherWrapper
from stepdistill.utils.images import grid_image, save_grid

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FrozenPassOptions:
    """Precision of the passes through frozen networks (teacher, target), which need no gradients."""

    teacher_precision: Literal["same", "auto", "bf16", "fp16"] = "same"  # autocast dtype of the no-grad teacher and target passes (same: the step's --mixed_precision; auto: bf16 where the hardware does bf16 math, else same); diffusers' LCM scripts run them under torch.autocast, which is bf16 on a CPU

    def frozen_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for one frozen pass on ``device`` (a no-op for ``same``); callers convert outputs to float32."""
        precision = self.teacher_precision
        if precision == "auto":
            precision = "bf16" if has_native_bf16(device.type) else "same"
        elif precision == "bf16" and not has_native_bf16(device.type):
            warnings.warn(f"teacher_precision=bf16 on a {device.type} without native bf16 math is emulated and several "
                          "times slower than fp32 here; use teacher_precision=auto or same", stacklevel=2)
        if precision == "same":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@dataclass
class TeacherWeightsOption:
    """The dtype the teacher pipeline is loaded in, which every trainer offers."""

    teacher_weight_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the teacher pipeline's weights (denoiser, text encoders, VAE): bf16 halves a big teacher's memory (Flux's transformer: 24 instead of 48 GB), as diffusers' scripts do under --mixed_precision; trainable weights (adapter, full student, EMA copies) stay fp32


@functools.cache
def has_native_bf16(device_type: str) -> bool:
    """Whether bf16 autocast is a speed-up here: a CUDA device with bf16 support, or a CPU that oneDNN runs
    bf16 on (AVX-512 or newer). An AVX2-only CPU emulates bf16: the shipped progressive recipe's 2,600 steps
    took 3.2 s each there instead of 0.66 s in fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class LatentMethodBase:
    """Shared-loop plumbing for methods that train ``student_net`` on :class:`LatentPromptData` batches."""

    student_net: torch.nn.Module
    data: LatentPromptData

    def trainable_module(self) -> torch.nn.Module:
        return self.student_net

    def num_items(self) -> int:
        return len(self.data)

    def networks(self) -> list[torch.nn.Module]:
        """Every network a training step runs (student, teacher, target / EMA copies), each once."""
        found = {id(net): net for net in [*vars(self).values(), self.teacher.model] if isinstance(net, torch.nn.Module)}
        return list(found.values())

    def to_device(self, device: torch.device) -> None:
        """Put the teacher pipeline and every network or EMA state the method holds on the run's device
        (accelerate places only the trainable module; a full-model teacher or a target copy would stay behind)."""
        self.teacher.pipe.to(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
            elif hasattr(value, "to_device"):
                value.to_device(device)

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        latents, embeds = self.data.batch(indices, device)
        return {"latents": latents, "embeds": embeds}


def load_teacher_and_data(cfg: Any) -> tuple[TeacherWrapper, LatentPromptData]:
    """What every distillation script starts with: the teacher (xformers if asked, its prompt cache sized) and
    its encoded dataset (``DataOptions``: read and encoded chunk by chunk, or from the latent cache)."""
    from stepdistill.data import open_dataset
    from stepdistill.methods.latent_cache import cached_latents
    from stepdistill.methods.latent_data import encode_samples
    from stepdistill.prompt_cache import PromptCache
    from stepdistill.teacher import load_teacher
    from stepdistill.testbed import resolve_teacher_path

    teacher = load_teacher(resolve_teacher_path(cfg.pretrained_teacher_model), dtype=WEIGHT_DTYPES[cfg.teacher_weight_dtype],
                           max_sequence_length=cfg.max_sequence_length)
    if cfg.enable_xformers_memory_efficient_attention:
        from stepdistill.training.accel import enable_xformers

        enable_xformers(teacher.pipe)
    teacher.prompt_cache = PromptCache(cfg.prompt_cache_mb << 20)
    source = open_dataset(cfg.dataset, cfg.resolution, cfg.caption_column)
    if cfg.latent_cache_dir:
        return teacher, LatentPromptData(teacher, *cached_latents(teacher, source, cfg.latent_cache_dir, cfg.caption_column))
    _, latents, captions = encode_samples(teacher, source.samples(), cfg.resolution,
                                          show_progress=os.environ.get("RANK", "0") == "0")
    source.finish()
    return teacher, LatentPromptData(teacher, latents, captions)


def add_lora(model: torch.nn.Module, rank: int, alpha: float, is_dit: bool) -> LoraConfig:
    """Attach a peft LoRA adapter through diffusers' own ``add_adapter`` (the base weights stay frozen)."""
    if rank < 1:
        raise ConfigError(f"lora_rank={rank} must be at least 1")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=DIT_LORA_TARGETS if is_dit else UNET_LORA_TARGETS)
    model.add_adapter(config)
    return config


class adapters_disabled:  # noqa: N801 - used as a context manager
    """Run the base network of a LoRA-wrapped model: in LoRA mode the teacher is the student minus its adapter."""

    def __init__(self, model: torch.nn.Module, active: bool):
        self.model, self.active = model, active

    def __enter__(self) -> torch.nn.Module:
        if self.active:
            self.model.disable_adapters()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.model.enable_adapters()


def write_validation(images_by_steps: dict[int, torch.Tensor], step: int, out_dir: Path, accelerator: Accelerator) -> Path | None:
    """One PNG (rows: 1, 2, 4, 8 steps) and the same grid in TensorBoard when it is the tracker; written by the
    main process only (under FSDP every process samples)."""
    if not accelerator.is_main_process:
        return None
    rows = torch.cat(list(images_by_steps.values()))
    nrow = next(iter(images_by_steps.values())).shape[0]
    path = save_grid(rows, out_dir / f"steps-{'-'.join(map(str, images_by_steps))}-{step:06d}.png", nrow=nrow, scale=2)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid_image(rows, nrow, 2)), step, dataformats="HWC")
    return path


def build_student(teacher: TeacherWrapper, cfg: Any, time_cond_proj_dim: int | None = None,
                  init_from: str | None = None) -> torch.nn.Module:
    """The trainable network of a LoRA or full-model method: a seeded adapter on the teacher network itself
    (so the teacher is that network with the adapter disabled), or a copy of it next to the frozen teacher,
    optionally starting from another pipeline's denoiser (``init_from``, e.g. an exported student; a UNet
    student with a guidance embedding keeps it)."""
    torch.manual_seed(cfg.seed)  # LoRA initialisation is random: seed it so runs (and resumes) agree
    if cfg.use_lora:
        if init_from is not None:
            raise ConfigError(f"init_student_from={init_from!r} needs use_lora=false: a LoRA student starts from the teacher")
        if not hasattr(teacher.pipe, "load_lora_weights"):
            raise ConfigError(f"use_lora=true: {type(teacher.pipe).__name__} has no load_lora_weights, so a LoRA "
                              "student could not be loaded; train a full student (--use_lora false)")
        add_lora(teacher.model, cfg.lora_rank, cfg.lora_alpha, teacher.is_dit)
        cast_training_params(teacher.model, torch.float32)  # the adapter trains in fp32 on a half-precision base
        student = teacher.model
    else:
        teacher.model.requires_grad_(False)
        source = load_init_denoiser(teacher, init_from) if init_from is not None else None
        if source is not None and not teacher.is_dit:
            time_cond_proj_dim = source.config.get("time_cond_proj_dim")
        student = full_student(teacher.model, time_cond_proj_dim)
        if source is not None:
            copy_init_weights(student, source, init_from)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


def train_from_cli(config_cls: type, method_cls: type, argv: list[str] | None) -> tuple[Any, Any, dict[str, float]]:
    """What every distillation script does: parse the config, load teacher and data, train; returns
    (config, method, last logged values) for the script's closing line."""
    from stepdistill.config import parse_cli, to_dict
    from stepdistill.training.loop import run_training
    from stepdistill.training.side_thread import thread_budget

    cfg = parse_cli(config_cls, argv)
    torch.set_num_threads(thread_budget(cfg.num_threads))  # loading (VAE encodes, prompt caching) uses the cores too
    teacher, data = load_teacher_and_data(cfg)
    method = method_cls(cfg, teacher, data)
    return cfg, method, run_training(method, cfg, tracker_config=to_dict(cfg))


def full_student(teacher_net: torch.nn.Module, time_cond_proj_dim: int | None) -> torch.nn.Module:
    """A trainable copy of the teacher; UNets get a guidance embedding input (zero-initialised rows are new)."""
    if time_cond_proj_dim is None:
        return copy.deepcopy(teacher_net).requires_grad_(True).float()
    student = UNet2DConditionModel.from_config(teacher_net.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, _ = student.load_state_dict(teacher_net.state_dict(), strict=False)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()  # starts exactly as the teacher
    assert all("cond_proj" in name for name in missing), missing
    return student.requires_grad_(True).float()


def load_init_denoiser(teacher: TeacherWrapper, folder: str) -> torch.nn.Module:
    """The denoiser of a diffusers pipeline folder, loaded as the teacher's model class (safetensors only)."""
    sub = teacher.denoiser_name
    if not (Path(folder) / sub).is_dir():
        raise ConfigError(f"init_student_from={folder!r} has no {sub}/ folder; give a diffusers pipeline folder "
                          "such as a full-model student's pipeline/ export")
    return type(teacher.model).from_pretrained(folder, subfolder=sub, use_safetensors=True, local_files_only=True)


def copy_init_weights(student: torch.nn.Module, source: torch.nn.Module, folder: str) -> None:
    """Copy every weight of ``source`` into ``student``; a different architecture is a one-line error."""
    try:
        student.load_state_dict(source.state_dict())
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ConfigError(f"init_student_from={folder!r}: its denoiser does not match the teacher's architecture ({detail})") from None
