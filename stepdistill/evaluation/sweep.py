"""The step sweep: teacher solvers and students over step counts, with FID/KID, alignment, fidelity, latency.

Writes ``sweep.json``, ``sweep.md`` (markdown table), ``fid_vs_steps.png`` and one sample grid per row.
Every row uses the same prompts and, per seed, the same initial latents; numbers are mean and spread over seeds.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.errors import ConfigError
from stepdistill.evaluation.emoji_evaluator import load_evaluator
from stepdistill.evaluation.generate import Generator, load_student, shared_noise, teacher_solver
from stepdistill.evaluation.metrics import evaluator_outputs, image_set_metrics
from stepdistill.evaluation.report import write_markdown, write_plot
from stepdistill.teacher import guidance_passes, load_teacher
from stepdistill.testbed import resolve_teacher_path
from stepdistill.utils.images import save_grid


@dataclass
class SweepConfig:
    """What to sweep; every field is a command-line option of eval/sweep.py."""

    teacher: str = "tiny-sd"  # shipped teacher name or pipeline folder
    students: list[str] = field(default_factory=list)  # name=path entries (LoRA folder or pipeline folder)
    teacher_solvers: list[str] = field(default_factory=lambda: ["ddim", "dpmpp", "euler"])  # flow teachers: euler, dpmpp
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 25, 50])  # teacher step counts
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # student step counts
    guidance_scale: float = 4.0  # teacher classifier-free guidance
    reference_solver: str = "ddim"  # the teacher row that fidelity is measured against (flow: euler)
    reference_steps: int = 50  # its step count
    num_prompts: int = 0  # first N emoji32 captions spread over the set (0: all 1,388)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # one image set per seed
    batch_size: int = 256  # images per pipeline call
    evaluator: str | None = None  # evaluator weights (default: the shipped one)
    max_sequence_length: int = 8  # T5 tokens per prompt of SD3 / PixArt / Flux teachers (the testbed DiT: 8 zero tokens)
    latency_repeats: int = 5  # single-image calls timed per row (median)
    output_dir: str = "runs/sweep"  # results folder

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        for name in ("teacher_steps", "student_steps"):
            bad = [s for s in getattr(self, name) if s < 1]
            if bad:
                raise ConfigError(f"{name} contains {bad[0]}; step counts must be at least 1")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale={self.guidance_scale} must be 0 or more")


def _prompts(num_prompts: int) -> tuple[list[str], torch.Tensor]:
    captions = load_emoji32().captions
    rows = list(range(len(captions))) if num_prompts in (0, len(captions)) else \
        torch.linspace(0, len(captions) - 1, num_prompts).round().long().tolist()
    return [captions[i] for i in rows], torch.tensor(rows)


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Run every row and write the report files; returns the rows."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = resolve_teacher_path(cfg.teacher)
    teacher = load_teacher(teacher_path, max_sequence_length=cfg.max_sequence_length)
    call_kwargs = teacher.pipeline_call_kwargs()
    evaluator = load_evaluator(cfg.evaluator)
    prompts, labels = _prompts(cfg.num_prompts)
    real = load_emoji32().pixel_tensor()[labels]
    real_features, _ = evaluator_outputs(evaluator, real)
    noises = {seed: shared_noise(teacher, len(prompts), seed) for seed in cfg.seeds}
    teacher_gen = Generator("teacher", teacher.pipe, cfg.guidance_scale, call_kwargs)
    reference_solver = "euler" if teacher.schedule.kind == "flow" and cfg.reference_solver == "ddim" else cfg.reference_solver
    plan = [(teacher_gen, solver, steps) for solver in cfg.teacher_solvers for steps in cfg.teacher_steps]
    plan += [(load_student(spec, teacher_path, call_kwargs), None, steps) for spec in cfg.students for steps in cfg.student_steps]
    references = {}
    teacher.pipe.scheduler = teacher_solver(teacher.pipe, reference_solver)
    for seed in cfg.seeds:
        references[seed] = teacher_gen.images(prompts, cfg.reference_steps, noises[seed], cfg.batch_size)
    rows = []
    for gen, solver, steps in tqdm(plan, desc="sweep"):
        if solver is not None:
            gen.pipe.scheduler = teacher_solver(gen.pipe, solver)
        rows.append(_row(cfg, gen, solver, steps, prompts, labels, real_features, noises, references, evaluator, out))
    (out / "sweep.json").write_text(json.dumps({"config": cfg.__dict__, "rows": rows}, indent=2))
    write_markdown(rows, out / "sweep.md")
    write_plot(rows, out / "fid_vs_steps.png")
    return rows


def _row(cfg, gen, solver, steps, prompts, labels, real_features, noises, references, evaluator, out) -> dict:
    per_seed = []
    for seed in cfg.seeds:
        images = gen.images(prompts, steps, noises[seed], cfg.batch_size)
        per_seed.append(image_set_metrics(evaluator, images, labels, real_features, references[seed]))
        if seed == cfg.seeds[0]:
            label = f"{gen.name}-{solver}" if solver else gen.name
            save_grid(images[:16], out / "grids" / f"{label}-{steps:02d}steps.png", nrow=16, scale=2)
    row = {"model": gen.name, "solver": solver or "student", "steps": steps,
           "nfe": steps * guidance_passes(gen.pipe, gen.guidance_scale),
           "latency_ms": gen.latency_ms(prompts[0], steps, noises[cfg.seeds[0]], cfg.latency_repeats)}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed]
        row[key] = statistics.mean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row
