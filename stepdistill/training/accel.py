"""Optional accelerations with clear errors where the machine cannot provide them."""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import torch

from stepdistill.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def enable_xformers(pipe: DiffusionPipeline) -> None:
    """xformers memory-efficient attention; every xformers op needs CUDA, so refuse clearly without it."""
    if not torch.cuda.is_available():
        raise ConfigError("enable_xformers_memory_efficient_attention=true needs a CUDA GPU; this machine has none "
                          "(PyTorch's SDPA attention is used by default)")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError("enable_xformers_memory_efficient_attention=true needs xformers; pip install 'stepdistill[xformers]'") from None
    pipe.enable_xformers_memory_efficient_attention()


def require_compiler(option: str) -> None:
    """Inductor builds its CPU kernels with a C++ compiler; without one the first call fails deep in torch."""
    if not torch.cuda.is_available() and shutil.which("c++") is None and shutil.which("g++") is None:
        raise ConfigError(f"{option} on a CPU needs a C++ compiler for inductor (g++); install it "
                          "(apt-get install g++) or leave it off")


def speed_up_networks(networks: list[torch.nn.Module], compile_networks: bool, channels_last: bool) -> None:
    """Apply the optional speed-ups in place, so every caller (student, teacher pass, target pass) gets them
    and state-dict keys, checkpoints and exports stay unchanged."""
    if compile_networks:
        require_compiler("torch_compile=true")
    for net in networks:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile_networks:
            net.compile(dynamic=False)  # in place (no `_orig_mod.` keys); static shapes: the CPU kernels are faster


# Each (module, input shapes) pair is its own graph with dynamic=False; a sampling benchmark meets several
# (plain and CFG batches, per-call and per-sample timesteps, every images-per-call size). Past the limit
# torch silently runs eager again, which would time the wrong thing.
SAMPLING_RECOMPILE_LIMIT = 64


def compile_for_sampling(pipe: DiffusionPipeline, backend: str = "inductor") -> None:
    """Compile a pipeline's denoiser and VAE decoder in place (inductor, static shapes), as users deploy a
    few-step model for latency: it removes the per-call Python overhead that dominates a small network at one
    image per call. The first call at each shape compiles (seconds to minutes); time only after it."""
    if backend == "inductor":
        require_compiler("--sampling_compile true")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), SAMPLING_RECOMPILE_LIMIT))
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    for net in (denoiser, pipe.vae.decoder):
        net.compile(dynamic=False, backend=backend)
