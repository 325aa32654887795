"""Writing students the way diffusers users load them: LoRA in diffusers key format, model cards."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from stepdistill.teacher import TeacherWrapper
from stepdistill.training.checkpoint import removed_unless_finished, swap_into_place

STUDENT_META = "stepdistill_student.json"
TMP_PREFIX = ".tmp-"  # replace_folder writes into this sibling of the final folder
SIGMA_GRID_KEY = "sigma_grid"  # in STUDENT_META: "uniform" means call with sigmas=uniform_call_sigmas(N),
# "lcm" with sigmas=lcm_call_sigmas(N, meta[LCM_ORIGINAL_STEPS_KEY])
LCM_ORIGINAL_STEPS_KEY = "original_inference_steps"
GUIDANCE_EMBEDS_KEY = "guidance_embeds"  # Flux LoRAs: whether the transformer it was trained on had a guidance embedding
# a flow LCM student's scheduler: FlowMatchLCMScheduler unshifted, so the call's sigmas are the trained grid
FLOW_LCM_SCHEDULER = "FlowMatchLCMScheduler"
FLOW_LCM_SCHEDULER_KWARGS = {"shift": 1.0, "use_dynamic_shifting": False}


def read_student_meta(folder: Path | str) -> dict[str, Any]:
    """A student folder's ``stepdistill_student.json`` (scheduler, guidance scale, sigma grid); {} if absent."""
    path = Path(folder) / STUDENT_META
    return json.loads(path.read_text()) if path.is_file() else {}


def sampling_grid_meta(teacher: TeacherWrapper) -> dict[str, Any]:
    """STUDENT_META entries a pipeline call needs beyond the scheduler: flow students of every trainer sample
    on the uniform grid of ``solvers.uniform_call_sigmas``."""
    return {SIGMA_GRID_KEY: "uniform"} if teacher.schedule.kind == "flow" else {}


def flow_lcm_grid_meta(num_ddim_timesteps: int) -> dict[str, Any]:
    """STUDENT_META entries of a flow LCM student (LoRA or full): the sigma grid a pipeline call passes."""
    return {SIGMA_GRID_KEY: "lcm", LCM_ORIGINAL_STEPS_KEY: num_ddim_timesteps}


def scheduler_setup(name: str, kwargs: dict[str, Any]) -> str:
    """The model card's line that builds a LoRA student's scheduler from the teacher pipeline's."""
    return f"{name}.from_config(pipe.scheduler.config" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"


EXPORT_KEPT = ("any earlier copy is kept; the run's checkpoints are too: free some space, then rerun with "
               "--resume_from_checkpoint latest to write it again")


def replace_folder(final: Path, write: Callable[[Path], None], kept: str = EXPORT_KEPT) -> Path:
    """Let ``write`` fill a temporary sibling, then swap it into place: a crash never leaves half a folder.
    ``kept`` is what the one-line disk-full error tells the user survives and what to do."""
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with removed_unless_finished(tmp, repr(str(final)), kept):
        write(tmp)
    swap_into_place(tmp, final)
    return final


def write_lora(model: torch.nn.Module, teacher: TeacherWrapper, out_dir: Path, scheduler: str | None,
               method: str = "lcm-lora", scheduler_kwargs: dict[str, Any] | None = None,
               extra_meta: dict[str, Any] | None = None) -> None:
    """``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(dir)`` accepts.

    Keys get diffusers' ``unet.`` / ``transformer.`` prefixes and the adapter config is stored as metadata,
    without which an alpha != rank LoRA reloads with the wrong scale.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # peft key names (lora_A / lora_B); diffusers' old-format conversion renames attention keys to
    # `.lora.down` forms that diffusers 0.42's loader then silently skips.
    layers = get_peft_model_state_dict(model)
    layers = {k: v.detach().to(torch.float32).contiguous() for k, v in layers.items()}
    metadata = model.peft_config["default"].to_dict()
    pipe_cls = type(teacher.pipe)
    if teacher.is_dit:
        pipe_cls.save_lora_weights(out_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    else:
        pipe_cls.save_lora_weights(out_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    meta: dict[str, Any] = {"method": method, "teacher_class": pipe_cls.__name__, "guidance_scale": 1.0}
    if teacher.is_flux:  # FLUX.1-dev's and -schnell's layouts take the same LoRA shapes: say which one it is for
        meta[GUIDANCE_EMBEDS_KEY] = teacher.embedded_guidance
    if scheduler:
        meta["scheduler"] = scheduler
    if scheduler_kwargs:
        meta["scheduler_kwargs"] = scheduler_kwargs
    meta.update(extra_meta or {})
    (out_dir / STUDENT_META).write_text(json.dumps(meta, indent=2))


def write_model_card(out_dir: Path, cfg: Any, teacher: TeacherWrapper, lora: bool, steps: int = 4,
                     guidance_scale: float | None = None, scheduler_setup: str | None = None,
                     call_sigmas: list[float] | None = None, student_prediction: str | None = None) -> None:
    """A README.md next to the weights saying what they are and how to load them.

    ``scheduler_setup`` is the scheduler line of a LoRA's usage example (default: LCMScheduler for UNets);
    ``call_sigmas`` is the noise grid the example passes when the student needs its own;
    ``student_prediction`` is the student's output type where it is not the teacher's."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
    pipe_cls = type(teacher.pipe).__name__
    folder = out_dir.name.removeprefix(TMP_PREFIX)  # the card is written inside replace_folder's sibling
    if scheduler_setup is None and teacher.schedule.kind != "flow":
        scheduler_setup = "LCMScheduler.from_config(pipe.scheduler.config)"
    sigmas = "" if call_sigmas is None else f", sigmas={[round(v, 4) for v in call_sigmas]}"
    if lora and scheduler_setup:
        usage = (f"pipe = {pipe_cls}.from_pretrained(TEACHER)\npipe.scheduler = {scheduler_setup}\n"
                 f"pipe.load_lora_weights(\"{folder}\")\n"
                 f"image = pipe(prompt, num_inference_steps={steps}{sigmas}, guidance_scale=1.0).images[0]")
    elif lora:
        usage = f"pipe = {pipe_cls}.from_pretrained(TEACHER)\npipe.load_lora_weights(\"{folder}\")"
    else:
        guidance = "" if guidance_scale is None else f", guidance_scale={guidance_scale:g}"
        usage = (f"pipe = DiffusionPipeline.from_pretrained(\"{folder}\")\n"
                 f"image = pipe(prompt, num_inference_steps={steps}{sigmas}{guidance}).images[0]")
    lines = [f"# {cfg.__class__.__name__.removesuffix('Config')} student of `{cfg.pretrained_teacher_model}`", "",
             f"Distilled with stepdistill from a `{pipe_cls}` teacher ({teacher.prediction_type} prediction).", "",
             *([] if student_prediction in (None, teacher.prediction_type) else
               [f"The student outputs `{student_prediction}`, and its scheduler config says so: build any other "
                "scheduler with `from_config(pipe.scheduler.config)` to keep it.", ""]),
             *([] if not teacher.embedded_guidance else
               ["The network reads the guidance scale as an input, and the student was trained with it at 1.0: "
                f"call the pipeline with `guidance_scale=1.0` ({pipe_cls} defaults to 3.5).", ""]),
             "```python", usage, "```", "", "## Training options", "",
             *[f"- `{k}`: {v}" for k, v in sorted(options.items())]]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
