"""The one training loop every trainer uses: accelerate, checkpoints, resume, logging, validation, export.

A trainer supplies a ``TrainingMethod`` (its data, its loss, what to export); this module owns the rest,
so progressive distillation, LCM, LADD and the testbed teachers all checkpoint and resume the same way.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.methods.export import replace_folder
from stepdistill.training.accel import speed_up_networks
from stepdistill.training.checkpoint import list_checkpoints, load_extra_states, resolve_resume, save_checkpoint
from stepdistill.training.deepspeed_setup import configure_deepspeed, engine_load_options, weights_only_engine_loads
from stepdistill.training.launch_check import lone_process_warning
from stepdistill.training.log_window import LogWindow
from stepdistill.training.nonfinite import NonFiniteCounter, step_unless_nonfinite
from stepdistill.training.side_thread import thread_budget
from stepdistill.training.sharding import check_sharding, is_sharded, launch_fallback_warning, whole_module
from stepdistill.training.step_random import StepRandom, batch_indices
from stepdistill.training.timing import timed
from stepdistill.training.trainable_state import keep_checkpoints_to_trainable_weights


@dataclass
class LoopConfig:
    """Options of the shared loop; trainer configs embed these fields under the same names."""

    output_dir: str = "runs/out"  # checkpoints, logs and exports go here
    overwrite_output_dir: bool = False  # allow a fresh run into a folder that already holds results
    max_train_steps: int = 1000  # optimizer steps
    train_batch_size: int = 64  # per process
    learning_rate: float = 1e-4  # peak learning rate
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 100  # linear warm-up steps
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision (GPU)
    seed: int = 0  # seeds data order, noise and initialisation
    checkpointing_steps: int = 500  # save a resumable checkpoint every N steps
    checkpoints_total_limit: int | None = 2  # keep at most this many checkpoints
    resume_from_checkpoint: str | None = None  # 'latest' or a checkpoint folder
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # experiment tracker
    validation_steps: int = 500  # write validation samples every N steps (0: never)
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite losses/gradients (checked when logging)
    logging_steps: int = 1  # read losses to the host and log every N steps (GPU: > 1 avoids a host-device sync per step)
    num_threads: int = 0  # torch CPU threads per process (0: CPU-only machines: every core this process may use; GPU: torch's default)
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (CUDA only) to cut optimizer memory on big teachers
    torch_compile: bool = False  # compile every network the step runs (torch.compile, inductor): minutes of warm-up, faster steps
    channels_last: bool = False  # networks in channels_last memory format (for GPU convolutions; slower on the CPU testbed)

    def validate_loop(self) -> None:
        """Reject values the loop cannot run with."""
        for name in ("max_train_steps", "train_batch_size", "checkpointing_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be positive")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit={self.checkpoints_total_limit} must be at least 1 or none")
        if self.validation_steps < 0:
            raise ConfigError(f"validation_steps={self.validation_steps} must be 0 (never) or positive")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads={self.num_threads} must be 0 (every core this process may use) or positive")


class TrainingMethod(Protocol):
    """What a trainer plugs into the loop."""

    name: str  # stored in checkpoints so that another trainer's checkpoint is refused
    export_name: str  # sub-folder of output_dir that receives the final result

    def trainable_module(self) -> torch.nn.Module: ...
    def num_items(self) -> int: ...
    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]: ...
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any], rand: StepRandom) -> tuple[torch.Tensor, dict[str, float]]: ...
    def after_optimizer_step(self, model: torch.nn.Module) -> None: ...
    def checkpoint_objects(self) -> list[Any]: ...
    def validate(self, model: torch.nn.Module, step: int, out_dir: Path, accelerator: Accelerator) -> None: ...
    def export(self, model: torch.nn.Module, out_dir: Path) -> None: ...


class NonFiniteLossError(StepdistillError):
    """Training produced too many non-finite losses or gradients in a row."""


def prepare_output_dir(cfg: LoopConfig) -> Path:
    """Check that ``output_dir`` may be written without destroying earlier results."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is a file; give a folder path")
    has_results = out.is_dir() and any(out.iterdir())
    if has_results and cfg.resume_from_checkpoint is None and not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir={cfg.output_dir!r} already holds results; pass --resume_from_checkpoint latest, "
                          "--overwrite_output_dir, or another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_accelerator(cfg: LoopConfig, out: Path) -> Accelerator:
    """Accelerator with the tracker and precision the config asks for."""
    message = lone_process_warning(os.environ)
    if message is not None:
        warnings.warn(message, stacklevel=2)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    # cpu=True on machines without CUDA makes torchrun / accelerate multi-process runs use gloo (MULTI_CPU)
    # step_scheduler_with_optimizer=False: the scheduler advances once per optimizer step, not once per process,
    # so a checkpoint's schedule position means the same whatever number of processes resumes it
    return Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with, project_config=project,
                       cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def scheduler_calls_per_step(accelerator: Accelerator) -> int:
    """How often a prepared LR scheduler is stepped per training step: accelerate's default links it to the
    optimizer and steps it once per process; :func:`make_accelerator` unlinks it (once per step)."""
    linked = accelerator.step_scheduler_with_optimizer and not accelerator.split_batches
    return accelerator.num_processes if linked else 1


def export_atomically(method: TrainingMethod, model: torch.nn.Module, out: Path) -> Path:
    """Write the final result into a temporary folder and rename it into place only when complete."""
    return replace_folder(out / method.export_name, lambda tmp: method.export(model, tmp))


def make_optimizer(cfg: LoopConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (with a clear error where it cannot run)."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay)
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, fused=True, **kwargs)  # fused: skips non-finite steps on the device
    if not torch.cuda.is_available():
        raise ConfigError("use_8bit_adam=true needs a CUDA GPU (bitsandbytes); this machine has none")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("use_8bit_adam=true needs bitsandbytes; pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def run_training(method: TrainingMethod, cfg: LoopConfig, tracker_config: dict[str, Any] | None = None,
                 accelerator: Accelerator | None = None) -> dict[str, float]:
    """Train ``method`` to ``cfg.max_train_steps``, resuming if asked; returns the last logged values.
    Runs on ``thread_budget(cfg.num_threads)`` torch threads and restores the caller's count afterwards."""
    cfg.validate_loop()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(thread_budget(cfg.num_threads))
    try:
        return _run_training(method, cfg, tracker_config, accelerator)
    finally:
        torch.set_num_threads(threads_before)


def _run_training(method: TrainingMethod, cfg: LoopConfig, tracker_config: dict[str, Any] | None,
                  accelerator: Accelerator | None) -> dict[str, float]:
    out = prepare_output_dir(cfg)
    accelerator = accelerator or make_accelerator(cfg, out)
    fallback = launch_fallback_warning(os.environ, accelerator)
    if fallback is not None:
        warnings.warn(fallback, stacklevel=2)
    refusal = getattr(method, "sharding_refusal", lambda: None)()  # optional: why these settings cannot run under FSDP
    check_sharding(accelerator, method.name, refusal)
    configure_deepspeed(accelerator, cfg.train_batch_size, cfg.max_grad_norm)
    keep_checkpoints_to_trainable_weights(accelerator)  # a LoRA student's frozen base comes from the teacher again
    to_device = getattr(method, "to_device", None)  # optional: networks and state accelerate does not place
    if to_device is not None:
        to_device(accelerator.device)
    model = method.trainable_module()
    networks = getattr(method, "networks", lambda: [model])()  # optional: every network the step runs
    speed_up_networks(networks, cfg.torch_compile, cfg.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    calls = scheduler_calls_per_step(accelerator)
    own_scheduler = getattr(method, "make_lr_scheduler", None)  # optional: a trainer-specific learning-rate plan
    lr_scheduler = own_scheduler(optimizer, calls) if own_scheduler is not None else None
    if lr_scheduler is None:
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * calls,
                                     num_training_steps=cfg.max_train_steps * calls)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    prepare_extra = getattr(method, "prepare_extra", None)  # optional: e.g. a discriminator and its optimizer
    if prepare_extra is not None:
        prepare_extra(accelerator, out)
    start = 0
    identity = getattr(method, "checkpoint_identity", dict)()  # optional: settings a resume must keep
    resume = resolve_resume(out, cfg.resume_from_checkpoint, method.name, identity)
    if resume is not None:
        with weights_only_engine_loads(accelerator, model):
            accelerator.load_state(str(resume[0]), **engine_load_options(accelerator, model))
        load_extra_states(method.checkpoint_objects(), resume[0])
        start = resume[1]
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers(method.name, config={k: v for k, v in (tracker_config or {}).items()
                                                     if isinstance(v, (int, float, str, bool))})
    getattr(method, "start_training", lambda: None)()  # optional: e.g. start a helper thread
    try:
        logs = _train_steps(method, cfg, accelerator, model, optimizer, lr_scheduler, start, out)
    finally:
        getattr(method, "close", lambda: None)()  # optional: stop helper threads, also when a step failed
    accelerator.wait_for_everyone()
    shipped = accelerator.unwrap_model(model)
    # optional ``export_reads_model`` (default True): False where export writes a whole copy the method keeps
    if is_sharded(accelerator) and getattr(method, "export_reads_model", True):
        shipped = whole_module(shipped, accelerator.device)  # a collective: every process gathers, the main one writes
    if accelerator.is_main_process:
        export_atomically(method, shipped, out)
    accelerator.end_training()
    return logs


def _train_steps(method, cfg, accelerator, model, optimizer, lr_scheduler, start, out) -> dict[str, float]:
    """The hot loop: batch, loss, backward, clip, step; skips non-finite steps on the device. Values are read
    to the host only at logging, checkpoint and final steps."""
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world
    progress = tqdm(range(start, cfg.max_train_steps), initial=start, total=cfg.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc=method.name)
    window, nonfinite, logs = LogWindow(), NonFiniteCounter(accelerator.device), {}
    prefetch = getattr(method, "prefetch", None)  # optional: start the next step's model-independent work early

    def step_inputs(step: int) -> tuple[dict[str, Any], StepRandom]:
        indices = batch_indices(method.num_items(), global_batch, step, cfg.seed, rank, cfg.train_batch_size)
        with timed("data"):
            batch = method.make_batch(indices, accelerator.device)
        return batch, StepRandom(cfg.seed, step, rank, world, cfg.train_batch_size, accelerator.device)

    upcoming = None
    for step in progress:
        model.train()
        batch, rand = upcoming if upcoming is not None else step_inputs(step)
        with timed("student"), accelerator.autocast():  # teacher / discriminator time is split off inside
            loss, method_logs = method.compute_loss(model, batch, rand)
            upcoming = step_inputs(step + 1) if prefetch is not None and step + 1 < cfg.max_train_steps else None
            if upcoming is not None:
                prefetch(*upcoming)  # same batch and draws the step will use, so results do not change
        with timed("student"):
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            nonfinite.add(step_unless_nonfinite(optimizer, loss, grad_norm, accelerator))
            lr_scheduler.step()
            method.after_optimizer_step(model)  # an EMA update after a skipped step moves towards unchanged weights
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window.add({"loss": loss, **method_logs})
        if done % cfg.logging_steps == 0 or done % cfg.checkpointing_steps == 0 or done == cfg.max_train_steps:
            logs = _read_window(window, nonfinite, cfg, done, accelerator, lr_scheduler)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=done)
        on_step_end = getattr(method, "on_step_end", None)  # optional hook, before the checkpoint so it is saved
        if on_step_end is not None:
            on_step_end(model, done, out, accelerator)
        if done % cfg.checkpointing_steps == 0 or done == cfg.max_train_steps:
            save_checkpoint(accelerator, out, done, method.name, cfg.checkpoints_total_limit, method.checkpoint_objects(),
                            getattr(method, "checkpoint_identity", dict)())
        # a sharded student samples only when every process runs it; the main process alone writes the grid
        validating_here = accelerator.is_main_process or is_sharded(accelerator)
        if cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_train_steps) and validating_here:
            method.validate(accelerator.unwrap_model(model), done, out / "validation", accelerator)
    return logs


def _read_window(window: LogWindow, nonfinite: NonFiniteCounter, cfg: LoopConfig, done: int, accelerator: Accelerator,
                 lr_scheduler) -> dict[str, float]:
    """The one host read per logging window; stops the run when too many non-finite steps came in a row."""
    skipped, longest = nonfinite.read()
    if longest >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(f"{longest} consecutive non-finite losses or gradients by step {done} "
                                 f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); lower learning_rate or check the data")
    return {**window.read(accelerator), "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped}


def final_loss_text(logs: dict[str, float], digits: int = 5) -> str:
    """The scripts' closing words about the loss; a resume at max_train_steps runs no step and has none."""
    if "loss" not in logs:
        return "no training step ran (the checkpoint was already at max_train_steps)"
    return f"final loss {logs['loss']:.{digits}f}"


def latest_step(output_dir: str | Path) -> int:
    """Step of the newest complete checkpoint in ``output_dir`` (0 when there is none)."""
    found = list_checkpoints(Path(output_dir))
    return int(found[-1].name.split("-")[1]) if found else 0


def steps_per_epoch(num_items: int, global_batch: int) -> int:
    """How many steps make one pass over the data."""
    return max(math.floor(num_items / global_batch), 1)
