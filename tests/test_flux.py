"""Flux teachers (FLUX.1-schnell's layout, no guidance embedding) through all three trainers: the students
they export load into FluxPipeline and sample there as the trainers' own samplers do."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from method_runs import train_method
from stepdistill.methods.ladd import LADDConfig, LADDMethod
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod
from stepdistill.solvers import uniform_call_sigmas
from stepdistill.teacher import pipeline_guidance, pipeline_latents

pytestmark = pytest.mark.filterwarnings("ignore:max_sequence_length=8 cuts every prompt")
PROMPTS = ["rocket", "sun"]


def noise(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def pipeline_sample(pipe: FluxPipeline, meta: dict, steps: int, latents: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    """What a user's FluxPipeline call returns for the student, unpacked to image-shaped latents."""
    sigmas = {"sigmas": uniform_call_sigmas(steps)} if meta.get("sigma_grid") == "uniform" else {}
    packed = pipe(PROMPTS, num_inference_steps=steps, output_type="latent", max_sequence_length=8,
                  generator=torch.Generator().manual_seed(1), **sigmas, **pipeline_guidance(pipe, guidance),
                  **pipeline_latents(pipe, latents)).images
    return pipe._unpack_latents(packed, 8, 8, vae_scale_factor=1)


def test_lcm_lora_loads_into_a_fresh_flux_pipeline_with_the_trained_adapter(random_teachers, tmp_path):
    method = train_method(LCMConfig, LCMMethod, random_teachers / "flux", tmp_path / "run", w_min=3.0, w_max=3.0)
    meta = json.loads((tmp_path / "run" / "lora" / "stepdistill_student.json").read_text())
    assert meta["teacher_class"] == "FluxPipeline" and meta.get("scheduler") is None
    fresh = FluxPipeline.from_pretrained(random_teachers / "flux", dtype=torch.float32)
    x, t = noise(0), torch.tensor([999, 500])
    embeds = method.teacher.encode_prompts(PROMPTS)
    plain = method.teacher.with_model(fresh.transformer).predict(x, t, embeds).x0
    fresh.load_lora_weights(str(tmp_path / "run" / "lora"))
    loaded = method.teacher.with_model(fresh.transformer).predict(x, t, embeds).x0
    trained = method.teacher.with_model(method.student_net).predict(x, t, embeds).x0
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3  # the adapter was trained and is really loaded


@pytest.mark.parametrize("use_lora,sampler", [(True, "deterministic"), (False, "stochastic")])
def test_ladd_student_samples_in_flux_pipeline_as_in_our_sampler(random_teachers, tmp_path, use_lora, sampler):
    """The stochastic sampler's re-noising draws in the pipeline's packed layout, so its samples equal ours in
    distribution, not image by image: there only the 1-step sample (no re-noising) is compared."""
    method = train_method(LADDConfig, LADDMethod, random_teachers / "flux", tmp_path / "run", use_lora=use_lora,
                          student_sampler=sampler, synthetic_steps=2, timestep_warmup_steps=2, disc_hidden=8,
                          distill_weight=0.5)
    folder = tmp_path / "run" / ("lora" if use_lora else "pipeline")
    meta = json.loads((folder / "stepdistill_student.json").read_text())
    if use_lora:
        pipe = FluxPipeline.from_pretrained(random_teachers / "flux", dtype=torch.float32)
        pipe.load_lora_weights(str(folder))
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        assert isinstance(pipe, FluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    if "scheduler" in meta:
        pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(pipe.scheduler.config, **meta.get("scheduler_kwargs", {}))
    for steps in (1, 2, 4) if sampler == "deterministic" else (1,):
        ours = method.sample(method.student_net, PROMPTS, steps, noise(3), seed=1)
        torch.manual_seed(1)
        torch.testing.assert_close(pipeline_sample(pipe, meta, steps, noise(3)), ours, atol=2e-4, rtol=1e-4)


def test_progressive_rounds_export_flux_pipelines_that_sample_as_our_sampler(random_teachers, tmp_path):
    method = train_method(ProgressiveConfig, ProgressiveMethod, random_teachers / "flux", tmp_path / "run", start_steps=4,
                          end_steps=1, iterations_per_round=2, max_train_steps=0, w_min=2.0, w_max=2.0)
    for folder, steps in ((tmp_path / "run" / "rounds" / "round-0-2steps", 2), (tmp_path / "run" / "pipeline", 1)):
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        assert isinstance(pipe, FluxPipeline)
        pipe.set_progress_bar_config(disable=True)
        meta = json.loads((folder / "stepdistill_student.json").read_text())
        ours = method.sample(pipe.transformer, PROMPTS, steps, noise(5), guidance_scale=meta["guidance_scale"])
        theirs = pipeline_sample(pipe, meta, steps, noise(5), guidance=meta["guidance_scale"])
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)



def test_progressive_student_learns_the_flux_teachers_two_steps_in_one(random_teachers, tmp_path):
    """One round, 2 -> 1 steps: the student's 1-step samples move towards the teacher's 2-step ones (same
    prompts and noise), so the trainer really learns through Flux's packed patches, not only runs."""
    from method_runs import build_method
    from stepdistill.sampling import sample_latents
    from stepdistill.training.loop import run_training

    method = build_method(ProgressiveConfig, ProgressiveMethod, random_teachers / "flux", tmp_path / "run", start_steps=2,
                          end_steps=1, iterations_per_round=100, max_train_steps=0, learning_rate=1e-3, w_min=2.0,
                          w_max=2.0, checkpointing_steps=1000)
    prompts, start = ["rocket", "sun", "red apple", "hamster face"], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    teacher_two = sample_latents(method.teacher, prompts, 2, 3.0, start)  # guided by w + 1, as the student learns
    before = (method.sample(method.teacher.model, prompts, 1, start) - teacher_two).pow(2).mean()
    run_training(method, method.cfg)
    final = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", dtype=torch.float32).transformer
    after = (method.sample(final, prompts, 1, start) - teacher_two).pow(2).mean()
    assert after < 0.5 * before, (before, after)
