"""What the trainers need to run a student sharded by FSDP (accelerate's ``fsdp_version: 2``).

Under FSDP2 every process holds only a slice of each student weight (a ``DTensor``). The EMA and target copies
the full-model trainers keep beside the student stay whole, plain modules on every process (as do the frozen
teacher and discriminator heads), so that their passes and exports need no collective and can run on a side
thread or on the main process alone. Where the student is read whole (EMA updates, a progressive round's
handoff, LADD's export) its weights are gathered or cut here; every process must make those calls together.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from stepdistill.errors import ConfigError


# LoRA trainers' refusal: the adapter sits on the teacher network itself, and the teacher's (and target's)
# passes run that network outside the sharded student's forward
LORA_UNSHARDED = ("use_lora=true (a LoRA student's base is the teacher network, which the teacher passes run outside "
                  "the sharded forward; use_lora=false trains a full student, which FSDP shards)")


def is_sharded(accelerator: Accelerator) -> bool:
    """True when accelerate shards the prepared student (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def launch_fallback_warning(env: Mapping[str, str], accelerator: Accelerator) -> str | None:
    """The warning for a run launched with an FSDP or DeepSpeed config that accelerate runs without it, else
    None: it takes those paths only on accelerator devices and turns such launches on CPU processes into DDP
    without a word."""
    for name, flag, kind in (("FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP),
                             ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if env.get(flag, "false").lower() == "true" and accelerator.distributed_type != kind:
            return (f"the launch asked for {name} but accelerate runs this process as "
                    f"{accelerator.distributed_type.value} (it uses {name} only on GPUs): the run goes on without it")
    return None


def check_sharding(accelerator: Accelerator, method_name: str, refusal: str | None) -> None:
    """Refuse, in one line, FSDP runs this code cannot do right: FSDP version 1 (its flattened parameters
    are not the student's own) and method settings a method refuses (``refusal`` says why)."""
    if not is_sharded(accelerator):
        return
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise ConfigError(f"fsdp_version={version} is not supported; set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp_2node.yaml)")
    if refusal is not None:
        raise ConfigError(f"{method_name} cannot run sharded by FSDP with {refusal}; launch it with DDP "
                          "(configs/accelerate/ddp_8gpu.yaml)")


@functools.cache  # looked up once: the EMA update calls it every step
def _dtensor() -> type | tuple:
    """torch's DTensor class, or an empty tuple (matches nothing) where torch has no public one (before 2.5;
    accelerate's FSDP2 needs 2.6 anyway)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor


def full_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor whole: an FSDP2 slice (``DTensor``) is gathered from every process (a collective), a plain
    tensor is returned as it is."""
    dtensor = _dtensor()
    return [t.full_tensor() if isinstance(t, dtensor) else t for t in tensors]


@torch.no_grad()
def lerp_towards(targets: list[torch.Tensor], sources: Iterable[torch.Tensor], weight: float) -> None:
    """``target += weight * (source - target)`` for each pair: an EMA step of whole copies towards the
    student's weights, gathered first where they are sharded."""
    torch._foreach_lerp_(targets, full_tensors(sources), weight)


@torch.no_grad()
def load_whole_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into ``model``, sharded or not: each process cuts its own slice
    (every process holds the same whole state, so nothing is sent)."""
    own, dtensor = model.state_dict(), _dtensor()
    if not any(isinstance(t, dtensor) for t in own.values()):
        model.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    sliced = {name: distribute_tensor(state[name].to(t.dtype), t.device_mesh, t.placements, src_data_rank=None)
              if isinstance(t, dtensor) else state[name] for name, t in own.items()}
    model.load_state_dict(sliced)


@torch.no_grad()
def copy_whole_into(targets: list[torch.Tensor], wholes: Iterable[torch.Tensor]) -> None:
    """Copy whole tensors into ``targets``; a sharded target takes only its own slice (no communication)."""
    dtensor = _dtensor()
    for target, whole in zip(targets, wholes):
        if isinstance(target, dtensor):
            from torch.distributed.tensor import distribute_tensor

            whole = distribute_tensor(whole.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(whole)


def whole_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A plain copy on ``device``, with whole weights, of a diffusers network that FSDP2 shards (a collective:
    every process calls it). FSDP2 changes the network's class in place; the copy is built from the original
    class, directly on the device (on the host, eight processes' copies of a large network would not fit)."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    state = module.state_dict()
    with torch.device(device):
        plain = cls.from_config(module.config)
    plain.load_state_dict(dict(zip(state, full_tensors(state.values()))))
    return plain

