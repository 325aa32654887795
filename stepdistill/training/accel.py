"""Optional accelerations with clear errors where the machine cannot provide them."""
from __future__ import annotations

import shutil

import torch

from stepdistill.errors import ConfigError


def enable_xformers(pipe) -> None:
    """xformers memory-efficient attention; every xformers op needs CUDA, so refuse clearly without it."""
    if not torch.cuda.is_available():
        raise ConfigError("enable_xformers_memory_efficient_attention=true needs a CUDA GPU; this machine has none "
                          "(PyTorch's SDPA attention is used by default)")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError("enable_xformers_memory_efficient_attention=true needs xformers; pip install 'stepdistill[xformers]'") from None
    pipe.enable_xformers_memory_efficient_attention()


def speed_up_networks(networks: list[torch.nn.Module], compile_networks: bool, channels_last: bool) -> None:
    """Apply the optional speed-ups in place, so every caller (student, teacher pass, target pass) gets them
    and state-dict keys, checkpoints and exports stay unchanged."""
    if compile_networks and not torch.cuda.is_available() and shutil.which("c++") is None and shutil.which("g++") is None:
        raise ConfigError("torch_compile=true on a CPU needs a C++ compiler for inductor (g++); install it "
                          "(apt-get install g++) or leave torch_compile off")
    for net in networks:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile_networks:
            net.compile(dynamic=False)  # in place (no `_orig_mod.` keys); static shapes: the CPU kernels are faster
