"""Flux teachers through all three trainers, in both layouts: FLUX.1-schnell's (guided in two passes) and
FLUX.1-dev's (a guidance embedding). The students they export load into FluxPipeline and sample there as the
trainers' own samplers do, and training moves a student towards its teacher."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from method_runs import train_method
from stepdistill.methods.ladd import LADDConfig, LADDMethod
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod
from stepdistill.solvers import lcm_call_sigmas, uniform_call_sigmas
from stepdistill.teacher import pipeline_guidance, pipeline_latents

pytestmark = pytest.mark.filterwarnings("ignore:max_sequence_length=8 cuts every prompt")
PROMPTS = ["rocket", "sun"]
KINDS = pytest.mark.parametrize("kind", ["flux", "flux_dev"])


def noise(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def pipeline_sample(pipe: FluxPipeline, meta: dict, steps: int, latents: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    """What a user's FluxPipeline call returns for the student, unpacked to image-shaped latents."""
    grid = meta.get("sigma_grid")
    sigmas = ({"sigmas": uniform_call_sigmas(steps)} if grid == "uniform" else
              {"sigmas": lcm_call_sigmas(steps, meta["original_inference_steps"])} if grid == "lcm" else {})
    packed = pipe(PROMPTS, num_inference_steps=steps, output_type="latent", max_sequence_length=8,
                  generator=torch.Generator().manual_seed(1), **sigmas, **pipeline_guidance(pipe, guidance),
                  **pipeline_latents(pipe, latents)).images
    return pipe._unpack_latents(packed, 8, 8, vae_scale_factor=1)


@KINDS
def test_lcm_lora_loads_into_a_fresh_flux_pipeline_with_the_trained_adapter(random_teachers, tmp_path, kind):
    method = train_method(LCMConfig, LCMMethod, random_teachers / kind, tmp_path / "run", w_min=3.0, w_max=3.0)
    meta = json.loads((tmp_path / "run" / "lora" / "stepdistill_student.json").read_text())
    assert meta["teacher_class"] == "FluxPipeline" and meta["scheduler"] == "FlowMatchLCMScheduler"
    fresh = FluxPipeline.from_pretrained(random_teachers / kind, dtype=torch.float32)
    x, t = noise(0), torch.tensor([999, 500])
    embeds = method.teacher.encode_prompts(PROMPTS)
    plain = method.teacher.with_model(fresh.transformer).predict(x, t, embeds).x0
    fresh.load_lora_weights(str(tmp_path / "run" / "lora"))
    loaded = method.teacher.with_model(fresh.transformer).predict(x, t, embeds).x0
    trained = method.teacher.with_model(method.student_net).predict(x, t, embeds).x0
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3  # the adapter was trained and is really loaded
    # sampled as the model card says: FlowMatchLCMScheduler, unshifted, on the LCM grid (re-noising draws in the
    # packed layout, so only the 1-step sample is compared image by image, as for LADD's stochastic sampler)
    fresh.scheduler = getattr(diffusers, meta["scheduler"]).from_config(fresh.scheduler.config, **meta["scheduler_kwargs"])
    fresh.set_progress_bar_config(disable=True)
    ours = method.sample(method.student_net, PROMPTS, 1, noise(3), seed=1)
    torch.testing.assert_close(pipeline_sample(fresh, meta, 1, noise(3)), ours, atol=2e-4, rtol=1e-4)


@KINDS
@pytest.mark.parametrize("use_lora,sampler", [(True, "deterministic"), (False, "stochastic")])
def test_ladd_student_samples_in_flux_pipeline_as_in_our_sampler(random_teachers, tmp_path, kind, use_lora, sampler):
    """The stochastic sampler's re-noising draws in the pipeline's packed layout, so its samples equal ours in
    distribution, not image by image: there only the 1-step sample (no re-noising) is compared."""
    method = train_method(LADDConfig, LADDMethod, random_teachers / kind, tmp_path / "run", use_lora=use_lora,
                          student_sampler=sampler, synthetic_steps=2, timestep_warmup_steps=2, disc_hidden=8,
                          distill_weight=0.5)
    folder = tmp_path / "run" / ("lora" if use_lora else "pipeline")
    meta = json.loads((folder / "stepdistill_student.json").read_text())
    if use_lora:
        pipe = FluxPipeline.from_pretrained(random_teachers / kind, dtype=torch.float32)
        pipe.load_lora_weights(str(folder))
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        assert isinstance(pipe, FluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    if "scheduler" in meta:
        pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(pipe.scheduler.config, **meta.get("scheduler_kwargs", {}))
    assert meta["guidance_scale"] == 1.0
    assert ("call the pipeline with `guidance_scale=1.0`" in (folder / "README.md").read_text()) == (kind == "flux_dev")
    for steps in (1, 2, 4) if sampler == "deterministic" else (1,):
        ours = method.sample(method.student_net, PROMPTS, steps, noise(3), seed=1)
        torch.manual_seed(1)
        torch.testing.assert_close(pipeline_sample(pipe, meta, steps, noise(3)), ours, atol=2e-4, rtol=1e-4)


@KINDS
def test_progressive_rounds_export_flux_pipelines_that_sample_as_our_sampler(random_teachers, tmp_path, kind):
    method = train_method(ProgressiveConfig, ProgressiveMethod, random_teachers / kind, tmp_path / "run", start_steps=4,
                          end_steps=1, iterations_per_round=2, max_train_steps=0, w_min=2.0, w_max=2.0)
    for folder, steps in ((tmp_path / "run" / "rounds" / "round-0-2steps", 2), (tmp_path / "run" / "pipeline", 1)):
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        assert isinstance(pipe, FluxPipeline)
        pipe.set_progress_bar_config(disable=True)
        meta = json.loads((folder / "stepdistill_student.json").read_text())
        ours = method.sample(pipe.transformer, PROMPTS, steps, noise(5), guidance_scale=meta["guidance_scale"])
        theirs = pipeline_sample(pipe, meta, steps, noise(5), guidance=meta["guidance_scale"])
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)



@KINDS
def test_progressive_student_learns_the_flux_teachers_two_steps_in_one(random_teachers, tmp_path, kind):
    """One round, 2 -> 1 steps: the student's 1-step samples move towards the teacher's 2-step ones (same
    prompts and noise), so the trainer really learns through Flux's packed patches, not only runs."""
    from method_runs import build_method
    from stepdistill.sampling import sample_latents
    from stepdistill.training.loop import run_training

    method = build_method(ProgressiveConfig, ProgressiveMethod, random_teachers / kind, tmp_path / "run", start_steps=2,
                          end_steps=1, iterations_per_round=100, max_train_steps=0, learning_rate=1e-3, w_min=2.0,
                          w_max=2.0, checkpointing_steps=1000)
    prompts, start = ["rocket", "sun", "red apple", "hamster face"], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    teacher_two = sample_latents(method.teacher, prompts, 2, 3.0, start)  # guided by w + 1, as the student learns
    before = (method.sample(method.teacher.model, prompts, 1, start) - teacher_two).pow(2).mean()
    run_training(method, method.cfg)
    final = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", dtype=torch.float32).transformer
    after = (method.sample(final, prompts, 1, start) - teacher_two).pow(2).mean()
    assert after < 0.5 * before, (before, after)


@KINDS
def test_step_sweep_evaluates_a_flux_teacher_and_student(request, tmp_path, kind):
    """The sweep calls Flux pipelines with packed latents and their own way of guiding: the teacher's row at
    the reference step count reproduces the reference images (CFG 4), and a student folder is sampled too."""
    from safetensors.torch import save_file

    from stepdistill.evaluation.emoji_evaluator import EmojiClassifier
    from stepdistill.evaluation.sweep import SweepConfig, run_sweep

    pipe = request.getfixturevalue(f"{kind}_pipe")
    pipe.save_pretrained(tmp_path / "teacher")
    pipe.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "stepdistill_student.json").write_text(json.dumps({"guidance_scale": 1.0, "sigma_grid": "uniform"}))
    torch.manual_seed(0)
    save_file(EmojiClassifier(1388).state_dict(), str(tmp_path / "evaluator.safetensors"))
    cfg = SweepConfig(teacher=str(tmp_path / "teacher"), students=[f"fast={tmp_path / 'student'}"], teacher_solvers=["euler", "dpmpp"],
                      teacher_steps=[1, 3], student_steps=[2], reference_steps=3, num_prompts=8, seeds=[0], batch_size=8,
                      evaluator=str(tmp_path / "evaluator.safetensors"), latency_repeats=1, max_sequence_length=8,
                      output_dir=str(tmp_path / "out"))
    rows = run_sweep(cfg)
    assert [(r["model"], r["solver"], r["steps"]) for r in rows] == [
        ("teacher", "euler", 1), ("teacher", "euler", 3), ("teacher", "dpmpp", 1), ("teacher", "dpmpp", 3), ("fast", "student", 2)]
    assert rows[1]["psnr_vs_teacher"] > 60 and rows[0]["psnr_vs_teacher"] < 60 and rows[3]["psnr_vs_teacher"] < 60
    assert rows[1]["nfe"] == (3 if kind == "flux_dev" else 6)  # the guidance embedding guides in one pass


@KINDS
def test_demo_shows_a_flux_teacher_beside_its_lora_student(random_teachers, tmp_path, kind):
    """The demo loads the student's LoRA into a fresh FluxPipeline and counts a guided teacher step as two
    passes, or one where the guidance embedding reads the scale."""
    import numpy as np

    from stepdistill.demo.backend import DemoBackend

    train_method(LADDConfig, LADDMethod, random_teachers / kind, tmp_path / "run", synthetic_steps=2,
                 timestep_warmup_steps=2, disc_hidden=8, distill_weight=0.5)
    backend = DemoBackend(str(random_teachers / kind), [f"ladd={tmp_path / 'run' / 'lora'}"])
    shots = backend.run("sun", seed=1, guidance_scale=3.5, teacher_steps=6, extra_steps=3)
    passes = 1 if kind == "flux_dev" else 2
    assert [(s.model, s.steps, s.nfe) for s in shots] == [("teacher (euler)", 6, 6 * passes),
                                                          *[("ladd", k, k) for k in (1, 2, 3, 4, 8)]]
    pixels = [np.asarray(s.image, dtype=np.float32) for s in shots]
    assert all(s.image.size == (256, 256) for s in shots) and np.abs(pixels[0] - pixels[1]).mean() > 1


@KINDS
def test_sampling_parts_time_a_guided_flux_step_as_its_pipeline_runs_it(request, monkeypatch, kind):
    """The speed benchmark's ``cfg_pass`` is one guided evaluation as FluxPipeline runs it: two passes one
    after the other (true CFG), or one pass reading the scale through the guidance embedding."""
    import stepdistill.evaluation.sampling_parts as parts_module
    from stepdistill.teacher import TeacherWrapper

    with pytest.warns(UserWarning, match="T5 tokens"):
        teacher = TeacherWrapper(request.getfixturevalue(f"{kind}_pipe"), max_sequence_length=8)
    calls: list[int] = []
    teacher.model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]),
                                            with_kwargs=True)
    counted = {}

    def once(fn, _repeats):  # each part called once, its denoiser calls (and their batch sizes) recorded
        calls.clear()
        fn()
        counted[len(counted)] = list(calls)
        return 1.0

    monkeypatch.setattr(parts_module, "median_ms", once)
    parts_module.sampling_parts_ms(teacher, batch_size=2, repeats=1)
    by_part = dict(zip(["encode", "encode_cfg", "pass", "cfg_pass", "decode"], counted.values()))
    assert by_part["pass"] == [2] and by_part["cfg_pass"] == ([2] if kind == "flux_dev" else [2, 2])


def test_a_lora_for_one_flux_layout_is_refused_by_the_other(random_teachers, tmp_path):
    """FLUX.1-dev's and -schnell's layouts take the same LoRA shapes, so diffusers would load either into either;
    the student's record of its layout is what refuses the wrong one, in one line that names both."""
    from stepdistill.errors import ModelError
    from stepdistill.evaluation.generate import load_student

    train_method(LCMConfig, LCMMethod, random_teachers / "flux", tmp_path / "run", w_min=3.0, w_max=3.0, max_train_steps=1)
    lora = tmp_path / "run" / "lora"
    assert json.loads((lora / "stepdistill_student.json").read_text())["guidance_embeds"] is False
    assert load_student(f"s={lora}", random_teachers / "flux", {}).pipe is not None
    with pytest.raises(ModelError, match=r"trained on a Flux transformer in FLUX.1-schnell's layout \(no guidance "
                                         r"embedding\); this teacher is in FLUX.1-dev's layout \(a guidance embedding\): "
                                         r"load it into"):
        load_student(f"s={lora}", random_teachers / "flux_dev", {})
    fitting = FluxPipeline.from_pretrained(random_teachers / "flux_dev", dtype=torch.float32)
    fitting.load_lora_weights(str(lora))  # diffusers itself takes it: the shapes fit
