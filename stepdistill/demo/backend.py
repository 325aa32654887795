"""What the demo computes, without any UI: one prompt through the teacher and each student, timed.

Kept free of gradio so it can be called (and tested) directly; ``app.py`` only lays it out.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from stepdistill.errors import StepdistillError
from stepdistill.evaluation.decoder_swap import load_decoder, use_decoder
from stepdistill.evaluation.generate import STUDENT_META, Generator, load_student, teacher_solver
from stepdistill.sampling import initial_noise
from stepdistill.teacher import guidance_passes, load_teacher
from stepdistill.testbed import resolve_teacher_path

STUDENT_STEPS = (1, 2, 4, 8)
MAX_TEACHER_STEPS = 100
MAX_STUDENT_STEPS = 16
MAX_SEED = 2 ** 31 - 1
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 300


class DemoInputError(StepdistillError, ValueError):
    """An input the demo refuses; the message is shown to the user as is."""


@dataclass
class Shot:
    """One generated image with what it cost."""

    model: str
    steps: int
    nfe: int
    milliseconds: float
    image: Image.Image

    @property
    def caption(self) -> str:
        return f"{self.model} · {self.steps} steps · {self.nfe} NFE · {self.milliseconds:.0f} ms"


def validate_inputs(prompt: str, seed: float, guidance_scale: float, teacher_steps: float, extra_steps: float) -> tuple[str, int, float, int, int]:
    """Clean the raw UI values or raise a one-line :class:`DemoInputError` naming the bad value."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise DemoInputError("prompt is empty; type what to draw, e.g. 'hamster face'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"prompt has {len(prompt)} characters; allowed at most {MAX_PROMPT_CHARS}")
    checks = [("seed", seed, 0, MAX_SEED, True), ("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE, False),
              ("teacher steps", teacher_steps, 1, MAX_TEACHER_STEPS, True), ("student steps", extra_steps, 1, MAX_STUDENT_STEPS, True)]
    for name, value, low, high, integral in checks:
        if value is None or not low <= float(value) <= high or (integral and float(value) != int(value)):
            kind = "an integer" if integral else "a number"
            raise DemoInputError(f"{name}={value!r} is out of range; allowed {kind} from {low} to {high}")
    return prompt, int(seed), float(guidance_scale), int(teacher_steps), int(extra_steps)


def find_latest_student(root: str | Path, teacher_class: str) -> Path | None:
    """The most recently written student folder under ``root`` that fits a teacher of this pipeline class."""
    found = []
    for meta_path in Path(root).rglob(STUDENT_META):
        if any(part.startswith(".tmp-") for part in meta_path.parts):
            continue
        meta = json.loads(meta_path.read_text())
        lora_for = meta.get("teacher_class")
        pipeline_class = _pipeline_class(meta_path.parent)
        if (lora_for or pipeline_class) == teacher_class or (pipeline_class and _same_family(pipeline_class, teacher_class)):
            found.append(meta_path.parent)
    return max(found, key=lambda p: (p / STUDENT_META).stat().st_mtime, default=None)


def _pipeline_class(folder: Path) -> str | None:
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def _same_family(student_class: str, teacher_class: str) -> bool:
    # a full LCM student of an SD teacher is a LatentConsistencyModelPipeline
    return student_class == "LatentConsistencyModelPipeline" and teacher_class == "StableDiffusionPipeline"


class DemoBackend:
    """The teacher and its students, loaded once; ``run`` draws one prompt through all of them."""

    def __init__(self, teacher: str = "tiny-sd", students: list[str] | None = None, max_sequence_length: int = 8,
                 decoder: str | None = None):
        self.teacher_path = resolve_teacher_path(teacher)
        wrapper = load_teacher(self.teacher_path, max_sequence_length=max_sequence_length)
        self.call_kwargs = wrapper.pipeline_call_kwargs()
        self.solver = "euler" if wrapper.schedule.kind == "flow" else "ddim"
        wrapper.pipe.scheduler = teacher_solver(wrapper.pipe, self.solver)
        wrapper.pipe.set_progress_bar_config(disable=True)
        self.teacher = Generator(f"teacher ({self.solver})", wrapper.pipe, 4.0, self.call_kwargs)
        self.wrapper = wrapper
        self.students = [self._load_student(spec) for spec in students or []]
        self.decoder = Path(decoder).name if decoder else None  # shown on the page: the timings depend on it
        if decoder:  # e.g. a TAESD: the timings then show what a tiny decoder saves, for the teacher and students alike
            use_decoder([self.teacher.pipe] + [s.pipe for s in self.students], load_decoder(decoder))
        self._lock = threading.Lock()  # pipelines keep scheduler state: one generation at a time

    def _load_student(self, spec: str) -> Generator:
        if "=" not in spec:
            folder = Path(spec)
            spec = f"{folder.parent.name}/{folder.name}={spec}"
        student = load_student(spec, self.teacher_path, self.call_kwargs)
        student.pipe.set_progress_bar_config(disable=True)
        return student

    def run(self, prompt: str, seed: float = 0, guidance_scale: float = 4.0, teacher_steps: float = 50,
            extra_steps: float = 3) -> list[Shot]:
        """Teacher at ``teacher_steps``, each student at 1, 2, 4, 8 and ``extra_steps`` steps, same noise."""
        prompt, seed, guidance_scale, teacher_steps, extra_steps = validate_inputs(prompt, seed, guidance_scale, teacher_steps, extra_steps)
        noise = initial_noise(self.wrapper, 1, seed)
        teacher = dataclasses.replace(self.teacher, guidance_scale=guidance_scale)
        plan = [(teacher, teacher_steps)]
        plan += [(s, k) for s in self.students for k in sorted(set(STUDENT_STEPS) | {extra_steps})]
        with self._lock, torch.no_grad():
            return [self._shot(gen, prompt, steps, noise) for gen, steps in plan]

    def _shot(self, gen: Generator, prompt: str, steps: int, noise: torch.Tensor) -> Shot:
        start = time.perf_counter()
        image = gen.images([prompt], steps, noise, 1)[0]
        elapsed = 1000 * (time.perf_counter() - start)
        array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        pil = Image.fromarray(array).resize((array.shape[1] * 8, array.shape[0] * 8), Image.NEAREST)
        return Shot(gen.name, steps, steps * guidance_passes(gen.pipe, gen.guidance_scale), elapsed, pil)
