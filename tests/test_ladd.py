"""LADD trainer mechanics on small random teachers: export formats and samplers, resume, bad options."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from method_runs import train_method
from stepdistill.errors import ConfigError
from stepdistill.methods.common import build_student
from stepdistill.methods.folded_lora import FoldedLora
from stepdistill.methods.ladd import LADDConfig, LADDMethod, resolve_student_prediction, student_timestep_set
from stepdistill.solvers import uniform_call_sigmas
from stepdistill.teacher import load_teacher


def grid_kwargs(meta: dict, steps: int) -> dict:
    """The sigmas a user passes for a flow student, as its model card says."""
    return {"sigmas": uniform_call_sigmas(steps)} if meta.get("sigma_grid") == "uniform" else {}


def train(teacher_dir: Path, out: Path, **overrides) -> LADDMethod:
    options = dict(synthetic_steps=2, timestep_warmup_steps=2, disc_hidden=8, distill_weight=0.5)
    return train_method(LADDConfig, LADDMethod, teacher_dir, out, **{**options, **overrides})


def test_student_timesteps_are_the_exported_schedulers_grids(random_teachers):
    sd = load_teacher(random_teachers / "sd")
    assert student_timestep_set(sd, [1, 2, 4]).tolist() == [999, 759, 499, 259]
    lcm = LCMScheduler.from_config(sd.pipe.scheduler.config)
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == [999, 759, 499, 259]
    sd3 = load_teacher(random_teachers / "sd3", max_sequence_length=8)
    flow = FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config)
    flow.set_timesteps(sigmas=uniform_call_sigmas(4))
    torch.testing.assert_close(student_timestep_set(sd3, [1, 2, 4]), flow.timesteps.float())
    assert student_timestep_set(sd3, [1, 2, 4]).tolist() == [1000, 750, 500, 250]  # no step at sigma 0.001


def test_timestep_warmup_moves_from_the_noisiest_to_uniform(random_teachers, tmp_path):
    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=1, timestep_warmup_steps=10, use_lora=False)
    assert method.timestep_probabilities(0).tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(method.timestep_probabilities(5), torch.tensor([0.625, 0.125, 0.125, 0.125]))
    torch.testing.assert_close(method.timestep_probabilities(50), torch.full((4,), 0.25))


@pytest.mark.parametrize("kind,cls", [("sd", StableDiffusionPipeline), ("sd3", StableDiffusion3Pipeline),
                                      ("sdxl", StableDiffusionXLPipeline)])
def test_lora_export_samples_like_our_sampler_in_a_fresh_pipeline(random_teachers, tmp_path, kind, cls):
    import diffusers

    method = train(random_teachers / kind, tmp_path / "run")
    lora_dir = tmp_path / "run" / "lora"
    meta = json.loads((lora_dir / "stepdistill_student.json").read_text())
    assert meta["method"] == "ladd-lora" and meta["guidance_scale"] == 1.0
    assert meta.get("sigma_grid") == ("uniform" if kind == "sd3" else None)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = cls.from_pretrained(random_teachers / kind, dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(pipe.scheduler.config, **meta["scheduler_kwargs"])
    call = {"max_sequence_length": 8} if kind == "sd3" else {}
    prompts = ["rocket", "sun"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for steps in (1, 2, 4):
        ours = method.sample(method.student_net, prompts, steps, noise, seed=9)
        torch.manual_seed(9)  # StableDiffusion3Pipeline does not hand its generator to scheduler.step
        theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, latents=noise, output_type="latent",
                      generator=torch.Generator().manual_seed(9), **grid_kwargs(meta, steps), **call).images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    card = (lora_dir / "README.md").read_text()
    assert 'load_lora_weights("lora")' in card and (("sigmas=[1.0, 0.75, 0.5, 0.25]" in card) == (kind == "sd3"))


@pytest.mark.parametrize("kind", ["sd", "sd3", "sdxl", "pixart"])
def test_full_student_pipeline_loads_with_its_few_step_scheduler(random_teachers, tmp_path, kind):
    method = train(random_teachers / kind, tmp_path / "run", use_lora=False)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler if kind == "sd3" else LCMScheduler)
    call = method.teacher.pipeline_call_kwargs()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = method.sample(method.student_net, ["fire", "sun"], 2, noise, seed=1)
    meta = json.loads((tmp_path / "run" / "pipeline" / "stepdistill_student.json").read_text())
    torch.manual_seed(1)
    theirs = pipe(["fire", "sun"], num_inference_steps=2, guidance_scale=1.0, latents=noise, output_type="latent",
                  generator=torch.Generator().manual_seed(1), **grid_kwargs(meta, 2), **call).images
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    plain = load_teacher(random_teachers / kind, max_sequence_length=8)  # the teacher itself is left as it was
    assert any((a - b).abs().max() > 0 for a, b in zip(plain.model.parameters(), method.student_net.parameters()))


def test_full_student_starts_from_another_pipelines_denoiser(random_teachers, tmp_path):
    first = train(random_teachers / "sd3", tmp_path / "first", use_lora=False)
    cfg = LADDConfig(use_lora=False)
    teacher = load_teacher(random_teachers / "sd3", max_sequence_length=8)
    student = build_student(teacher, cfg, init_from=str(tmp_path / "first" / "pipeline"))
    expected, got = first.student_net.state_dict(), student.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k].float()) for k in expected)
    assert all(p.requires_grad for p in student.parameters())
    assert any((a - b).abs().max() > 0 for a, b in zip(teacher.model.parameters(), student.parameters()))  # teacher untouched


def test_guidance_embedded_progressive_unet_student_is_refined_and_exported_at_its_w(random_teachers, tmp_path):
    from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod

    train_method(ProgressiveConfig, ProgressiveMethod, random_teachers / "sd", tmp_path / "pd", start_steps=2, end_steps=1,
                 iterations_per_round=2, max_train_steps=0, w_min=2.0, w_max=2.0)
    pd_student = tmp_path / "pd" / "pipeline"
    assert json.loads((pd_student / "stepdistill_student.json").read_text())["guidance_scale"] == 3.0
    method = train(random_teachers / "sd", tmp_path / "run", use_lora=False, init_student_from=str(pd_student),
                   student_steps=[1, 2])
    assert method.student_net.config.time_cond_proj_dim is not None and method.student_guidance == 3.0
    meta = json.loads((tmp_path / "run" / "pipeline" / "stepdistill_student.json").read_text())
    assert meta["guidance_scale"] == 3.0
    assert "guidance_scale=3" in (tmp_path / "run" / "pipeline" / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for steps in (1, 2):  # the pipeline feeds w = guidance_scale - 1 through timestep_cond, as our sampler does
        ours = method.sample(method.student_net, ["fire", "sun"], steps, noise, seed=2)
        theirs = pipe(["fire", "sun"], num_inference_steps=steps, guidance_scale=meta["guidance_scale"], latents=noise,
                      output_type="latent", generator=torch.Generator().manual_seed(2)).images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    without_w = method.teacher.with_model(method.student_net).predict(noise, torch.tensor(999), method.teacher.encode_prompts(["fire", "sun"]))
    with_w = method.teacher.with_model(method.student_net).predict(noise, torch.tensor(999), method.teacher.encode_prompts(["fire", "sun"]),
                                                                  **method.w_kwargs(noise))
    assert (with_w.x0 - without_w.x0).abs().max() > 1e-4  # the embedding is live, so feeding it matters


def test_student_init_from_a_folder_that_does_not_fit_is_refused(random_teachers, tmp_path):
    from diffusers import SD3Transformer2DModel

    teacher = load_teacher(random_teachers / "sd3", max_sequence_length=8)
    cfg = LADDConfig(use_lora=False)
    with pytest.raises(ConfigError, match=r"init_student_from='.*/sd' has no transformer/ folder"):
        build_student(teacher, cfg, init_from=str(random_teachers / "sd"))
    other = SD3Transformer2DModel.from_config({**teacher.model.config, "num_layers": teacher.model.config.num_layers + 1})
    other.save_pretrained(tmp_path / "deeper" / "transformer")
    with pytest.raises(ConfigError, match="does not match the teacher's architecture"):
        build_student(teacher, cfg, init_from=str(tmp_path / "deeper"))


def test_ladd_resume_reproduces_uninterrupted_run_with_discriminator_state(random_teachers, tmp_path):
    from safetensors.torch import load_file

    train(random_teachers / "sd", tmp_path / "a", max_train_steps=4)
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=2, checkpoints_total_limit=None)
    shutil.rmtree(tmp_path / "b" / "lora")
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest")
    a = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heads_a = load_file(tmp_path / "a" / "checkpoint-4" / "model_1.safetensors")
    heads_b = load_file(tmp_path / "b" / "checkpoint-4" / "model_1.safetensors")
    assert heads_a.keys() == heads_b.keys() and all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    assert (tmp_path / "b" / "checkpoint-4" / "optimizer_1.bin").is_file()  # the discriminator's optimizer state


def test_synthetic_cache_with_other_settings_is_refused(random_teachers, tmp_path):
    train(random_teachers / "sd", tmp_path / "run", max_train_steps=2)
    with pytest.raises(ConfigError, match="synthetic latent cache"):
        train(random_teachers / "sd", tmp_path / "run", max_train_steps=4, synthetic_steps=3, resume_from_checkpoint="latest")


@pytest.mark.parametrize("overrides,match", [
    (dict(student_steps=[0, 4]), r"student_steps=\[0, 4\]"),
    (dict(adversarial_weight=0.0, distill_weight=0.0), "at least one > 0"),
    (dict(disc_learning_rate=0.0), "disc_learning_rate=0.0 must be positive"),
    (dict(renoise_std=0.0), "renoise_std=0.0"),
    (dict(synthetic_steps=0), "synthetic_steps=0"),
    (dict(init_student_from="runs/pd/pipeline"), r"init_student_from='runs/pd/pipeline' needs use_lora=false"),
    (dict(deterministic_loss="final"), r"deterministic_loss='final' needs student_sampler=deterministic"),
    (dict(use_lora=False, student_prediction="x0"), r"student_prediction='x0' is not known; allowed: auto, epsilon"),
    (dict(student_prediction="sample"), r"student_prediction='sample' needs use_lora=false"),
])
def test_bad_ladd_options(overrides, match):
    with pytest.raises(ConfigError, match=match):
        LADDConfig(**overrides).validate()


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_real_data_feeds_the_discriminator_and_teacher_pairs_feed_the_regression(random_teachers, tmp_path, distill_weight):
    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=1, real_data="real", distill_weight=distill_weight)
    batch = method.make_batch([3, 1], torch.device("cpu"))
    dataset = method.data.latents[[3, 1]]
    if distill_weight == 0:  # purely adversarial against the dataset: no teacher pairs are made
        assert method.synthetic is None and "real_latents" not in batch
        assert torch.equal(batch["latents"], dataset)
        assert not (tmp_path / "run" / "synthetic_latents.safetensors").exists()
    else:  # the regression needs (noise -> sample) pairs; the discriminator still sees the dataset
        assert torch.equal(batch["real_latents"], dataset)
        assert torch.equal(batch["latents"], method.synthetic[0][[3, 1]])
        assert torch.equal(batch["pair_noise"], method.synthetic[1][[3, 1]])
        assert not torch.allclose(batch["latents"], dataset)
    from stepdistill.training.step_random import StepRandom

    seen = []
    step = method.adversarial.discriminator_step
    method.adversarial.discriminator_step = lambda real, *rest: seen.append(real) or step(real, *rest)
    method.compute_loss(method.student_net, batch, StepRandom(0, 50, 0, 1, 2, torch.device("cpu")))
    assert torch.equal(seen[0], dataset)


def test_regression_can_be_kept_to_the_noisiest_timestep(random_teachers, tmp_path):
    """Below t_max the regression target is a noised data latent's own x0, whose best estimate is a blurry
    posterior mean; with ``distill_timesteps=noisiest`` only the (noise -> teacher sample) pairs are regressed."""
    from stepdistill.training.step_random import StepRandom

    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=1, adversarial_weight=0.0, distill_weight=1.0)
    batch = method.make_batch([0, 1, 2, 3], torch.device("cpu"))

    def regression(where: str, index: int) -> float:
        method.cfg.distill_timesteps = where
        one_hot = torch.zeros(len(method.timesteps))
        one_hot[index] = 1.0
        method.timestep_probabilities = lambda step: one_hot
        return method.compute_loss(method.student_net, batch, StepRandom(0, 7, 0, 1, 4, torch.device("cpu")))[1]["distill_loss"].item()

    assert regression("noisiest", 0) == pytest.approx(regression("all", 0)) and regression("all", 0) > 0
    assert regression("all", 2) > 0 and regression("noisiest", 2) == 0.0


def test_deterministic_student_states_are_the_trailing_ddim_grids(random_teachers, tmp_path):
    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=1, student_sampler="deterministic")
    assert [int(grid[k]) for grid, k in method.states] == [999, 499, 749, 499, 249]  # noise once, then 2- and 4-step
    assert method.timestep_probabilities(0).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    ddim = DDIMScheduler.from_config(method.teacher.pipe.scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert method.states[2][0][:-1].tolist() == ddim.timesteps.tolist()


def test_deterministic_inputs_are_where_the_students_own_sampler_stands(random_teachers, tmp_path):
    """Backward simulation: a row drawn at step k of the N-step grid gets the student's own DDIM latent there."""
    from stepdistill.solvers import sample_ddim

    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=2, student_sampler="deterministic")
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    embeds = method.teacher.encode_prompts(["fire", "sun", "rocket", "moon"])
    picks = torch.tensor([0, 1, 4, 3])  # noise; 2-step grid after 1 step; 4-step grid after 3 and after 2 steps
    x, t = method.simulated_inputs(method.student_net, noise, embeds, picks)
    assert t.tolist() == [999, 499, 249, 499]
    student = method.teacher.with_model(method.student_net)
    for row, pick in enumerate(picks.tolist()):
        grid, k = method.states[pick]
        one = embeds.index(torch.tensor([row]))
        expected = sample_ddim(lambda z, s: student.predict(z, s, one), noise[row:row + 1], grid[:k + 1], method.teacher.schedule)
        torch.testing.assert_close(x[row:row + 1], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x[2], noise[2])


def test_final_output_loss_trains_the_whole_deterministic_sampler(random_teachers, tmp_path):
    """deterministic_loss=final: only each grid's last step is drawn, and the earlier steps keep their graph, so
    the loss on the output reaches the weights through every step (a no-grad simulation would not)."""
    from stepdistill.training.step_random import StepRandom

    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=1, student_sampler="deterministic",
                   deterministic_loss="final", student_steps=[2, 4], use_lora=False, adversarial_weight=0.0, distill_weight=1.0)
    assert [(len(grid) - 1, k) for grid, k in method.states] == [(2, 1), (4, 3)]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    embeds = method.teacher.encode_prompts(["fire", "sun"])
    x, t = method.simulated_inputs(method.student_net, noise, embeds, torch.tensor([1, 0]))
    assert x.requires_grad and t.tolist() == [249, 499]
    with torch.no_grad():  # sampling keeps no graph
        assert not method.simulated_inputs(method.student_net, noise, embeds, torch.tensor([1, 0]))[0].requires_grad
    method.student_net.zero_grad()
    x.square().sum().backward()  # x is the last step's input: any gradient here came through the earlier steps
    assert method.student_net.conv_in.weight.grad.abs().sum() > 0
    batch = method.make_batch([0, 1, 2, 3], torch.device("cpu"))
    loss, logs = method.compute_loss(method.student_net, batch, StepRandom(0, 3, 0, 1, 4, torch.device("cpu")))
    assert loss.requires_grad and logs["distill_loss"] > 0


@pytest.mark.parametrize("kind,use_lora", [("sd", True), ("sd", False), ("sd3", True), ("pixart", False)])
def test_deterministic_student_exports_ddim_or_euler_and_a_fresh_pipeline_reproduces_it(random_teachers, tmp_path, kind, use_lora):
    import diffusers

    method = train(random_teachers / kind, tmp_path / "run", student_sampler="deterministic", use_lora=use_lora)
    folder = tmp_path / "run" / ("lora" if use_lora else "pipeline")
    meta = json.loads((folder / "stepdistill_student.json").read_text())
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    if use_lora:
        assert meta["scheduler"] == ("FlowMatchEulerDiscreteScheduler" if kind == "sd3" else "DDIMScheduler")
        pipe = DiffusionPipeline.from_pretrained(random_teachers / kind, dtype=torch.float32, **extra)
        pipe.load_lora_weights(str(folder))
        pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(pipe.scheduler.config, **meta["scheduler_kwargs"])
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **extra)
        assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.set_progress_bar_config(disable=True)
    call = method.teacher.pipeline_call_kwargs()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    for steps in (1, 2, 4):
        ours = method.sample(method.student_net, ["fire", "sun"], steps, noise)
        theirs = pipe(["fire", "sun"], num_inference_steps=steps, guidance_scale=1.0, latents=noise, output_type="latent",
                      **grid_kwargs(meta, steps), **call).images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    card = (folder / "README.md").read_text()
    assert ("DDIMScheduler" in card) == (use_lora and kind == "sd") and "The student outputs" not in card  # the teacher's type


@pytest.mark.parametrize("sampler,scheduler_cls,prediction", [("deterministic", DDIMScheduler, "sample"),
                                                              ("stochastic", LCMScheduler, "v_prediction")])
def test_student_with_its_own_output_type_exports_it_and_a_chained_run_keeps_it(random_teachers, tmp_path, sampler,
                                                                                scheduler_cls, prediction):
    """An epsilon teacher's full student may output x0 or v; the export's scheduler says which, so a fresh
    pipeline samples as our sampler does, and a run started from that export reads the network the same way."""
    method = train(random_teachers / "sd", tmp_path / "run", use_lora=False, student_sampler=sampler, student_prediction=prediction,
                   max_train_steps=1)
    assert method.student(method.student_net).prediction_type == prediction and method.teacher.prediction_type == "epsilon"
    folder = tmp_path / "run" / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(pipe.scheduler, scheduler_cls) and pipe.scheduler.config.prediction_type == prediction
    assert f"The student outputs `{prediction}`" in (folder / "README.md").read_text()
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    for steps in (1, 2):
        ours = method.sample(method.student_net, ["fire", "sun"], steps, noise, seed=9)  # LCM re-noises with the seed
        theirs = pipe(["fire", "sun"], num_inference_steps=steps, guidance_scale=1.0, latents=noise, output_type="latent",
                      generator=torch.Generator().manual_seed(9)).images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    as_epsilon = method.teacher.with_model(method.student_net, "epsilon")  # the same weights read as the teacher's type
    with torch.no_grad():
        embeds = as_epsilon.encode_prompts(["fire", "sun"])
        t = torch.full((2,), 999)
        assert not torch.allclose(as_epsilon.predict(noise, t, embeds).x0, method.student(method.student_net).predict(noise, t, embeds).x0)
    chained = LADDConfig(use_lora=False, student_sampler=sampler, init_student_from=str(folder))
    assert resolve_student_prediction(chained, method.teacher) == prediction
    assert resolve_student_prediction(LADDConfig(use_lora=False), method.teacher) == "epsilon"  # no start folder: the teacher's


def test_resume_with_another_output_type_is_refused(random_teachers, tmp_path):
    """The checkpoint's weights would load into either reading; only the one they were trained for is allowed."""
    train(random_teachers / "sd", tmp_path / "run", use_lora=False, student_prediction="v_prediction", max_train_steps=1)
    with pytest.raises(ConfigError, match=r"trained with student_prediction='v_prediction' but this run has "
                                          r"student_prediction='epsilon'; pass --student_prediction v_prediction"):
        train(random_teachers / "sd", tmp_path / "run", use_lora=False, student_prediction="epsilon", max_train_steps=2,
              resume_from_checkpoint="latest")
    method = train(random_teachers / "sd", tmp_path / "run", use_lora=False, student_prediction="v_prediction",
                   max_train_steps=2, resume_from_checkpoint="latest")
    assert method.student_prediction == "v_prediction" and (tmp_path / "run" / "checkpoint-2").is_dir()


def test_flow_students_keep_the_velocity_output(random_teachers, tmp_path):
    with pytest.raises(ConfigError, match=r"student_prediction='sample' is for UNet \(VP\) teachers"):
        train(random_teachers / "sd3", tmp_path / "run", use_lora=False, student_prediction="sample", max_train_steps=1)


def test_ema_swapped_in_holds_the_average_and_gives_the_live_weights_back():
    from stepdistill.methods.target_adapter import AdapterEMA

    net = torch.nn.Linear(3, 2)
    start = net.weight.detach().clone()
    ema = AdapterEMA(net, decay=0.75)
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update()
    live = net.weight.detach().clone()
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in() as swapped:
        assert swapped is net
        torch.testing.assert_close(net.weight, start + 1.0)  # 0.75 * start + 0.25 * (start + 4)
        raise RuntimeError("inside")
    assert torch.equal(net.weight, live)


@pytest.mark.parametrize("use_lora", [False, True])
def test_student_ema_is_exported_and_resumed(random_teachers, tmp_path, use_lora):
    from safetensors.torch import load_file

    options = dict(use_lora=use_lora, ema_decay=0.5, checkpoints_total_limit=None)
    method = train(random_teachers / "sd", tmp_path / "a", max_train_steps=4, **options)
    weights = ("lora/pytorch_lora_weights.safetensors" if use_lora
               else "pipeline/unet/diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "a" / weights)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    live_sample = method.sample(method.student_net, ["rocket", "sun"], 2, noise, seed=9)
    with method.shipped_weights():
        ema_sample = method.sample(method.student_net, ["rocket", "sun"], 2, noise, seed=9)
    assert not torch.allclose(live_sample, ema_sample, atol=1e-4)  # the EMA is not the live student
    pipe = StableDiffusionPipeline.from_pretrained(random_teachers / "sd", dtype=torch.float32)
    if use_lora:
        pipe.load_lora_weights(str(tmp_path / "a" / "lora"))
    else:
        pipe.unet = type(pipe.unet).from_pretrained(tmp_path / "a" / "pipeline" / "unet")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0, original_inference_steps=50)
    pipe.set_progress_bar_config(disable=True)
    shipped = pipe(["rocket", "sun"], num_inference_steps=2, guidance_scale=1.0, latents=noise, output_type="latent",
                   generator=torch.Generator().manual_seed(9)).images
    torch.testing.assert_close(shipped, ema_sample, atol=2e-4, rtol=1e-4)  # the export ships the EMA

    train(random_teachers / "sd", tmp_path / "b", max_train_steps=2, **options)
    shutil.rmtree(tmp_path / "b" / weights.split("/")[0])
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest", **options)
    resumed = load_file(tmp_path / "b" / weights)
    assert exported.keys() == resumed.keys() and all(torch.equal(exported[k], resumed[k]) for k in exported)


def test_bad_ema_decay_is_refused():
    with pytest.raises(ConfigError, match=r"ema_decay=1.0 is out of range"):
        LADDConfig(ema_decay=1.0).validate()


def test_two_process_run_with_the_loss_through_every_step_equals_one_process_run(random_teachers, tmp_path):
    """deterministic_loss=final backpropagates through all the student's steps, so the DDP-wrapped student runs
    several forwards before one backward; 2 gloo processes x batch 2 must still give the batch-4 result."""
    from safetensors.torch import load_file

    from method_runs import apart_over_moved, one_and_two_process_losses

    options = ["--max_train_steps", "2", "--use_lora", "false", "--student_steps", "2", "--student_sampler", "deterministic",
               "--deterministic_loss", "final", "--timestep_warmup_steps", "0", "--real_data", "real", "--synthetic_steps",
               "2", "--disc_hidden", "8", "--distill_weight", "0.5"]
    loss_one, losses_two = one_and_two_process_losses("train_ladd.py", random_teachers / "sd", options, tmp_path, port=29541)
    assert len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * max(1.0, abs(loss_one)) for x in losses_two)
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    start = load_file(random_teachers / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    # over the whole network the runs must agree (measured: 1e-5 of the movement; one process at batch 2: 0.68)
    assert apart_over_moved(a, b, start) < 0.02
    # each process sampled every other caption's teacher latent; joined, they are the one process's pairs
    pairs_a, pairs_b = (load_file(tmp_path / run / "synthetic_latents.safetensors") for run in ("one", "two"))
    assert torch.equal(pairs_a["noise"], pairs_b["noise"])
    torch.testing.assert_close(pairs_a["latents"], pairs_b["latents"], atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").glob(".*synthetic*")) == []  # the shares are gone


@pytest.mark.parametrize("kind, overrides", [
    ("sd", {}),
    ("sd", dict(student_sampler="deterministic", deterministic_loss="final")),  # gradients through every student pass
    ("sd3", {}),
], ids=["unet", "unet-through-sampler", "dit"])
def test_folded_lora_forward_trains_as_the_branched_one(random_teachers, tmp_path, kind, overrides):
    """--lora_forward folded changes how the student's passes are computed, not what: the same run (the
    discriminator reading the same network with its adapter off) ends on the same adapter, up to float-order
    noise; a fold that dropped the adapter's scale or its gradient ends far apart."""
    from safetensors.torch import load_file

    from method_runs import apart_over_moved, build_method

    options = dict(synthetic_steps=2, timestep_warmup_steps=2, disc_hidden=8, distill_weight=0.5, max_train_steps=4,
                   learning_rate=1e-3, **overrides)
    prefix = "unet." if kind == "sd" else "transformer."
    start = {prefix + name.replace(".default", ""): p.detach().clone()
             for name, p in build_method(LADDConfig, LADDMethod, random_teachers / kind, tmp_path / "start",
                                         **options).student_net.named_parameters() if p.requires_grad}
    runs = {}
    for forward in ("branched", "folded"):
        method = train(random_teachers / kind, tmp_path / forward, lora_forward=forward, **options)
        runs[forward] = load_file(tmp_path / forward / "lora" / "pytorch_lora_weights.safetensors")
        assert isinstance(method.student(method.student_net).model, FoldedLora) == (forward == "folded")
    assert runs["branched"].keys() == start.keys()
    assert apart_over_moved(runs["branched"], runs["folded"], start) < 0.02


def test_folded_lora_forward_clashes_are_refused_for_ladd():
    with pytest.raises(ConfigError, match="lora_forward=folded cannot be combined with gradient_checkpointing=true"):
        LADDConfig(lora_forward="folded", gradient_checkpointing=True).validate()
    LADDConfig(lora_forward="folded", use_lora=False, gradient_checkpointing=True).validate()  # nothing to fold
