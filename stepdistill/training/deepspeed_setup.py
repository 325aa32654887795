"""What the training loop fills in for a run launched with a DeepSpeed config (accelerate's ``deepspeed_config``).

accelerate asks DeepSpeed for a micro-batch size it reads from a ``torch.utils.data.DataLoader``; the trainers
draw their own batches, so it is set here from ``train_batch_size``. ``gradient_clipping`` left at ``auto`` is
filled from ``max_grad_norm``: DeepSpeed clips inside its engine, and the loop's own clip call only reads the
norm. ZeRO stages 1 and 2 keep whole weights on every process, so EMA and target copies, exports and
validation run as under DDP; stage 3 partitions the weights like FSDP and is refused.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from stepdistill.errors import ConfigError

SUPPORTED_STAGES = (0, 1, 2)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    """True when accelerate hands the student to a DeepSpeed engine."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, train_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed settings the loop owns before ``prepare``, or refuse in one line what cannot run
    (ZeRO stage 3, gradient accumulation)."""
    if not uses_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(f"zero_stage={stage} is not supported (it partitions the student's weights); "
                          f"allowed: {', '.join(map(str, SUPPORTED_STAGES))}, or FSDP for a sharded student "
                          "(configs/accelerate/fsdp_2node.yaml)")
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ConfigError(f"gradient_accumulation_steps={accumulation} is not supported under DeepSpeed: the trainers "
                          "take one optimizer step per batch; raise train_batch_size or the number of processes")
    config["train_micro_batch_size_per_gpu"] = train_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = train_batch_size * accelerator.num_processes
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm


@contextlib.contextmanager
def weights_only_engine_loads(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Make DeepSpeed read its checkpoint files with the weights-only unpickler while a resume loads them.
    Its engine unpickles them without that restriction; the files it writes hold only tensors, containers and
    four small DeepSpeed value classes, allowlisted here, so a checkpoint with anything else fails to load.
    Only DeepSpeed's default (torch) checkpoint engine is patched; a resume through another one is refused."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    kind = type(getattr(model, "checkpoint_engine", None))
    if kind is not TorchCheckpointEngine:
        raise ConfigError(f"resuming through DeepSpeed's {kind.__name__} is not supported (only its default torch "
                          "checkpoint engine is read weights-only here); remove the checkpoint engine setting "
                          "from the DeepSpeed config")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(engine: TorchCheckpointEngine, path: str, map_location=None):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    original = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def engine_save_options(accelerator: Accelerator) -> dict:
    """Keyword arguments for ``save_state``: under DeepSpeed the engine leaves frozen weights (a LoRA
    student's base, which comes from the teacher again) out of its checkpoints."""
    return {"exclude_frozen_parameters": True} if uses_deepspeed(accelerator) else {}


def engine_load_options(accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """Keyword arguments for ``load_state``: a checkpoint without the frozen weights loads non-strictly, and
    only where the student has frozen weights (a full student's checkpoint must hold every weight)."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return {"load_module_strict": False} if uses_deepspeed(accelerator) and frozen else {}


def refresh_engine_master_weights(model: torch.nn.Module) -> None:
    """After weights are written into a DeepSpeed-prepared student from outside its optimizer (a progressive
    round restarting from the EMA), copy them into the engine's own fp32 master partitions, which its next
    step would otherwise write back over them. A no-op for students without an engine."""
    refresh = getattr(getattr(model, "optimizer", None), "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
