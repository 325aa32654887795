"""Checkpoints hold only what training changes. A LoRA student's frozen base is the teacher's network, loaded
again from the teacher on resume, so writing it into every checkpoint (3.4 GB per checkpoint for an SD1.5
UNet in fp32) would only fill the disk. Used as accelerate's save- and load-state hooks."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from stepdistill.errors import ConfigError

# accelerate writes these states itself, sharded, without passing them through the hooks' weight list
_OWN_STATE_WRITERS = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def frozen_parameter_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that training does not change (shared ones under every name)."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def drop_frozen_weights(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """Save-state hook: leave each model's frozen parameters out of the state accelerate is about to write."""
    for model, state in zip(models, weights):
        for name in frozen_parameter_names(model):
            state.pop(name, None)


def model_state_file(folder: Path, index: int) -> Path:
    """accelerate's file name for the ``index``-th prepared model's state."""
    return folder / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def load_trainable_weights(models: list[torch.nn.Module], input_dir: str) -> None:
    """Load-state hook: load every model's state, where only frozen parameters may be missing, then empty
    ``models`` so that accelerate's own strict load does not run. Checkpoints holding every weight load too."""
    files = [model_state_file(Path(input_dir), i) for i in range(len(models))]
    if not all(path.is_file() for path in files):
        return  # not written by this project's save: accelerate's own loader reports what is wrong
    for model, path in zip(models, files):
        state, own = load_file(path), model.state_dict()
        missing = own.keys() - state.keys() - frozen_parameter_names(model)
        unexpected = state.keys() - own.keys()
        reshaped = sorted(name for name in state.keys() & own.keys() if state[name].shape != own[name].shape)
        if missing or unexpected or reshaped:
            raise ConfigError(f"checkpoint file {str(path)!r} does not fit this run's network ({len(missing)} trainable "
                              f"weights missing, {len(unexpected)} unknown, {len(reshaped)} of another shape, e.g. "
                              f"{(sorted(missing) + sorted(unexpected) + reshaped)[0]!r}); resume it with the settings "
                              "it was trained with (such as lora_rank), or start a new output_dir")
        model.load_state_dict(state, strict=False)
    models.clear()


def keep_checkpoints_to_trainable_weights(accelerator: Accelerator) -> None:
    """Register the hooks, except where accelerate shards and writes model states itself (FSDP, DeepSpeed)."""
    if accelerator.distributed_type in _OWN_STATE_WRITERS:
        return
    accelerator.register_save_state_pre_hook(drop_frozen_weights)
    accelerator.register_load_state_pre_hook(load_trainable_weights)
