"""Generate image sets for the sweep with the pipelines themselves, so rows show what a user gets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from stepdistill.errors import ConfigError, ModelError
from stepdistill.evaluation.sampling_parts import median_ms
from stepdistill.methods.export import (GUIDANCE_EMBEDS_KEY, LCM_ORIGINAL_STEPS_KEY, SIGMA_GRID_KEY, STUDENT_META,
                                       read_student_meta)
from stepdistill.sampling import initial_noise
from stepdistill.solvers import lcm_call_sigmas, uniform_call_sigmas
from stepdistill.teacher import TeacherWrapper, load_teacher, pipeline_guidance, pipeline_latents

LORA_FILE = "pytorch_lora_weights.safetensors"


def teacher_solver(pipe: DiffusionPipeline, solver: str) -> diffusers.SchedulerMixin:
    """Scheduler for a teacher row; trailing spacing everywhere so few-step rows start at pure noise."""
    config = pipe.scheduler.config
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        if solver == "euler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        if solver == "dpmpp":  # Flux pipelines pass their size-dependent shift (mu), which needs dynamic shifting on
            dynamic = ({"use_dynamic_shifting": True, "time_shift_type": "exponential"}
                       if config.get("use_dynamic_shifting") else {})
            return diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                         flow_shift=config.get("shift", 1.0), **dynamic)
        raise ConfigError(f"solver {solver!r} is not available for flow teachers; choose euler or dpmpp")
    classes = {"ddim": diffusers.DDIMScheduler, "dpmpp": diffusers.DPMSolverMultistepScheduler,
               "euler": diffusers.EulerDiscreteScheduler}
    if solver not in classes:
        raise ConfigError(f"solver {solver!r} is not known; choose one of {', '.join(classes)}")
    return classes[solver].from_config(config, timestep_spacing="trailing")


@dataclass
class Generator:
    """A pipeline plus how to call it (scheduler swapped in by the caller)."""

    name: str
    pipe: DiffusionPipeline
    guidance_scale: float
    call_kwargs: dict
    sigma_grid: str | None = None  # "uniform" or "lcm": the student's own noise grid (see uniform_call_sigmas)
    original_inference_steps: int = 50  # "lcm": the skipping grid the student was trained on

    def step_kwargs(self, steps: int) -> dict:
        """Pipeline-call arguments that fix the ``steps``-step noise grid."""
        if self.sigma_grid == "uniform":
            return {"num_inference_steps": steps, "sigmas": uniform_call_sigmas(steps)}
        if self.sigma_grid == "lcm":
            return {"num_inference_steps": steps, "sigmas": lcm_call_sigmas(steps, self.original_inference_steps)}
        return {"num_inference_steps": steps}

    @torch.no_grad()
    def images(self, prompts: list[str], steps: int, noise: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Images in [-1, 1] for the prompts, starting from the given latents."""
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            result = self.pipe(chunk, **pipeline_guidance(self.pipe, self.guidance_scale),
                               **pipeline_latents(self.pipe, noise[start:start + len(chunk)]), output_type="pt",
                               **self.step_kwargs(steps), **self.call_kwargs)
            out.append(result.images.float() * 2 - 1)
        return torch.cat(out)

    def latency_ms(self, prompt: str, steps: int, noise: torch.Tensor, repeats: int = 5, batch_size: int = 1) -> float:
        """Median wall-clock time per image of one pipeline call making ``batch_size`` images of the prompt
        (text encoding and VAE decode included). At 1 it is the latency a user waits for one image; larger
        batches show the per-image cost once the network, not per-call overhead, is the bottleneck."""
        if noise.shape[0] < batch_size:
            raise ConfigError(f"batch_size={batch_size} needs {batch_size} initial latents, got {noise.shape[0]}")
        prompts, latents = [prompt] * batch_size, noise[:batch_size]
        return median_ms(lambda: self.images(prompts, steps, latents, batch_size), repeats) / batch_size


def load_student(spec: str, teacher_path: Path, call_kwargs: dict, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Generator:
    """``name=path``: a LoRA folder (loaded into a fresh teacher pipeline) or a full pipeline folder."""
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise ConfigError(f"student {spec!r} must look like name=path/to/lora_or_pipeline")
    folder = Path(path)
    meta = read_student_meta(folder)
    if (folder / LORA_FILE).is_file():
        pipe = load_teacher(teacher_path, device=device, dtype=dtype).pipe
        check_lora_fits(folder, pipe, meta)
        pipe.load_lora_weights(str(folder))
        pipe.fuse_lora()  # as users deploy it: the adapter folded into the weights ...
        pipe.unload_lora_weights()  # ... and the peft wrappers removed (they cost 20-30% of a 4-step call here)
    elif (folder / "model_index.json").is_file():
        pipe = load_teacher(folder, device=device, dtype=dtype).pipe
    else:
        raise ModelError(f"student {spec!r}: {path!r} holds neither {LORA_FILE} nor a pipeline (model_index.json)")
    if "scheduler" in meta:
        pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(pipe.scheduler.config, **meta.get("scheduler_kwargs", {}))
    grid = meta.get(SIGMA_GRID_KEY)
    if grid not in (None, "uniform", "lcm"):
        raise ModelError(f"student {spec!r}: {SIGMA_GRID_KEY}={grid!r} in {STUDENT_META} is not known; allowed: uniform, lcm")
    return Generator(name, pipe, float(meta.get("guidance_scale", 1.0)), call_kwargs, grid,
                     int(meta.get(LCM_ORIGINAL_STEPS_KEY, 50)))


def check_lora_fits(folder: Path, pipe: DiffusionPipeline, meta: dict) -> None:
    """Refuse a LoRA made for another architecture: diffusers would only warn and load nothing (or fail
    deep inside peft with a shape error)."""
    from safetensors import safe_open

    wanted = meta.get("teacher_class")
    if wanted and wanted != type(pipe).__name__:
        raise ModelError(f"LoRA {str(folder)!r} was trained for a {wanted}, not for this {type(pipe).__name__} teacher; "
                         f"load it into a {wanted}")
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    layouts = {True: "FLUX.1-dev's layout (a guidance embedding)", False: "FLUX.1-schnell's layout (no guidance embedding)"}
    trained_on, here = meta.get(GUIDANCE_EMBEDS_KEY), bool(denoiser.config.get("guidance_embeds", False))
    if trained_on is not None and bool(trained_on) != here:  # the shapes fit either way: only the record tells
        raise ModelError(f"LoRA {str(folder)!r} was trained on a Flux transformer in {layouts[bool(trained_on)]}; this "
                         f"teacher is in {layouts[here]}: load it into the Flux it was trained from")
    prefix = "unet." if hasattr(pipe, "unet") else "transformer."
    modules = dict(denoiser.named_modules())
    targets, shapes_ok = set(), True
    with safe_open(str(folder / LORA_FILE), framework="pt") as handle:
        for key in handle.keys():
            if not key.startswith(prefix):
                continue
            name = key.removeprefix(prefix).split(".lora_")[0]
            targets.add(name)
            layer = modules.get(name)
            fan_in = getattr(layer, "in_features", getattr(layer, "in_channels", None))
            shape = handle.get_slice(key).get_shape()
            if ".lora_A." in key and fan_in is not None and len(shape) >= 2 and shape[1] != fan_in:
                shapes_ok = False
    if not targets or not targets <= modules.keys() or not shapes_ok:
        raise ModelError(f"LoRA {str(folder)!r} does not fit this {type(pipe).__name__}'s {type(denoiser).__name__} "
                         f"(layer names or shapes differ); it was made for another architecture")


def shared_noise(teacher: TeacherWrapper, count: int, seed: int) -> torch.Tensor:
    """The initial latents every row uses for a given seed, so rows are compared image by image."""
    return initial_noise(teacher, count, seed)
