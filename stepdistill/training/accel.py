"""Optional accelerations with clear errors where the machine cannot provide them."""
from __future__ import annotations

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
