"""LCM / LCM-LoRA trainer mechanics on a small random teacher: export formats, sampler equivalence, resume."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import (DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler, PixArtSigmaPipeline,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)

from method_runs import train_method
from stepdistill.errors import ConfigError
from stepdistill.methods.lcm import LCMConfig, LCMMethod


def train(teacher_dir: Path, out: Path, **overrides) -> LCMMethod:
    return train_method(LCMConfig, LCMMethod, teacher_dir, out, **{"w_min": 2.0, "w_max": 6.0, **overrides})


@pytest.mark.parametrize("kind,cls", [("sd", StableDiffusionPipeline), ("sd3", StableDiffusion3Pipeline),
                                      ("sdxl", StableDiffusionXLPipeline)])
def test_lora_export_loads_into_fresh_pipeline_with_the_trained_scale(random_teachers, tmp_path, kind, cls):
    method = train(random_teachers / kind, tmp_path / "run")  # alpha 8 != rank 4
    lora_dir = tmp_path / "run" / "lora"
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    fresh = cls.from_pretrained(random_teachers / kind, dtype=torch.float32, **extra)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher = method.teacher
    embeds = teacher.encode_prompts(["rocket", "sun"])
    t = torch.tensor([999, 500])
    denoiser = lambda: fresh.transformer if kind == "sd3" else fresh.unet  # noqa: E731
    plain = teacher.with_model(denoiser()).predict(x, t, embeds).eps
    fresh.load_lora_weights(str(lora_dir))
    loaded = teacher.with_model(denoiser()).predict(x, t, embeds).eps
    trained = teacher.with_model(method.student_net).predict(x, t, embeds).eps
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3  # the LoRA changes the output
    meta = json.loads((lora_dir / "stepdistill_student.json").read_text())
    assert meta.get("scheduler") == ("LCMScheduler" if kind != "sd3" else "FlowMatchLCMScheduler")
    assert "load_lora_weights" in (lora_dir / "README.md").read_text()
    fresh.fuse_lora()
    fused = teacher.with_model(denoiser()).predict(x, t, embeds).eps
    torch.testing.assert_close(fused, trained, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind,cls", [("sd", LatentConsistencyModelPipeline), ("sdxl", StableDiffusionXLPipeline),
                                      ("pixart", PixArtSigmaPipeline)])
def test_full_student_pipeline_matches_our_sampler(random_teachers, tmp_path, kind, cls):
    w = {"w_min": 3.0, "w_max": 3.0} if kind == "pixart" else {}  # a DiT has no w input: one fixed w
    method = train(random_teachers / kind, tmp_path / "run", use_lora=False, **w)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", dtype=torch.float32)
    assert isinstance(pipe, cls) and isinstance(pipe.scheduler, LCMScheduler)
    if kind != "pixart":
        assert pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = ["rocket", "sun"]
    guidance = json.loads((tmp_path / "run" / "pipeline" / "stepdistill_student.json").read_text())["guidance_scale"]
    assert guidance == (1.0 if kind == "pixart" else 3.0)  # the DiT student has its w built in: no CFG
    ours = method.sample(method.target_net, prompts, 4, noise, guidance_scale=5.0 if kind != "pixart" else None, seed=7)
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=5.0 if kind != "pixart" else guidance, latents=noise,
                  output_type="latent", generator=torch.Generator().manual_seed(7), **method.teacher.pipeline_call_kwargs()).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_flow_student_samples_in_its_pipeline_as_in_our_sampler(random_teachers, tmp_path, use_lora):
    """A flow (SD3) LCM student, loaded as its model card says (FlowMatchLCMScheduler at shift 1, the LCM grid as
    ``sigmas``), samples what stepdistill's consistency sampler does, fresh noise included; the teacher's own
    Euler scheduler on its default grid, which is what loading the LoRA alone gives, does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    from stepdistill.evaluation.generate import load_student
    from stepdistill.solvers import lcm_call_sigmas

    method = train(random_teachers / "sd3", tmp_path / "run", use_lora=use_lora, w_min=3.0, w_max=3.0)
    folder = tmp_path / "run" / ("lora" if use_lora else "pipeline")
    card = (folder / "README.md").read_text()
    assert re.search(r"num_inference_steps=4, sigmas=\[1\.0, 0\.76, 0\.5, 0\.26\], guidance_scale=1(\.0)?\)", card)
    extra = {"text_encoder_3": None, "tokenizer_3": None}
    if use_lora:
        assert "FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)" in card
        pipe = StableDiffusion3Pipeline.from_pretrained(random_teachers / "sd3", dtype=torch.float32, **extra)
        teacher_scheduler = pipe.scheduler
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
        pipe.load_lora_weights(str(folder))
        net = method.student_net
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **extra)
        assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchLCMScheduler)
        teacher_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(random_teachers / "sd3", subfolder="scheduler")
        net = method.target_net
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts, call = ["rocket", "sun"], method.teacher.pipeline_call_kwargs()

    def pipeline_latents(steps: int, **kwargs) -> torch.Tensor:
        torch.manual_seed(7)  # FlowMatchLCMScheduler draws its fresh noise from the global generator
        return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, latents=noise, output_type="latent",
                    **kwargs, **call).images

    for steps in (1, 4):
        ours = method.sample(net, prompts, steps, noise, seed=7)
        torch.testing.assert_close(pipeline_latents(steps, sigmas=lcm_call_sigmas(steps)), ours, atol=1e-4, rtol=1e-4)
    pipe.scheduler = teacher_scheduler
    assert (pipeline_latents(4) - ours).abs().max() > 1e-2
    student = load_student(f"s={folder}", random_teachers / "sd3", {})  # the sweep's, the benchmark's and the demo's way
    assert isinstance(student.pipe.scheduler, FlowMatchLCMScheduler) and student.guidance_scale == 1.0
    assert student.step_kwargs(4) == {"num_inference_steps": 4, "sigmas": lcm_call_sigmas(4)}
    assert student.pipe.scheduler.config.shift == 1.0 and not student.pipe.scheduler.config.use_dynamic_shifting


def test_lora_student_of_a_pipeline_without_a_lora_loader_is_refused(random_teachers, tmp_path):
    """PixArt pipelines have no load_lora_weights: a LoRA student could not be loaded back, so it is refused
    before training, in one line that says what to do instead."""
    with pytest.raises(ConfigError, match="^use_lora=true: PixArtSigmaPipeline has no load_lora_weights, so a LoRA "
                                          "student could not be loaded; train a full student"):
        train(random_teachers / "pixart", tmp_path / "run", w_min=3.0, w_max=3.0)
    assert not (tmp_path / "run" / "lora").exists()


def test_lora_target_network_is_an_ema_adapter_run_through_the_student(random_teachers, tmp_path):
    """use_target_network in LoRA mode keeps EMA copies of the adapter only (not a second base network) and
    gives exactly what a full copy of the network holding those EMA weights would."""
    import copy

    method = train(random_teachers / "sd", tmp_path / "run", max_train_steps=3, use_target_network=True, ema_decay=0.5)
    net, ema = method.student_net, method.target_adapter
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert method.target_net is None and ema.shadow.keys() == trainable.keys()
    assert sum(t.numel() for t in ema.shadow.values()) < 0.5 * sum(p.numel() for p in net.parameters())
    assert any(not torch.equal(ema.shadow[n], p) for n, p in trainable.items())  # lags the student
    full_copy = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in full_copy.named_parameters():
            if name in ema.shadow:
                p.copy_(ema.shadow[name])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    embeds = method.teacher.encode_prompts(["rocket", "sun"])
    ours = method.teacher.with_model(method.target_model()).predict(x, t, embeds).eps
    torch.testing.assert_close(ours, method.teacher.with_model(full_copy).predict(x, t, embeds).eps, atol=0, rtol=0)
    assert not torch.allclose(ours, method.teacher.with_model(net).predict(x, t, embeds).eps)


def test_to_device_places_every_network_and_the_ema_adapter(random_teachers, tmp_path):
    """accelerate places only the trainable module; the method must move its other networks and EMA state."""
    full = train(random_teachers / "sd", tmp_path / "full", max_train_steps=1, use_lora=False)
    lora = train(random_teachers / "sd", tmp_path / "lora", max_train_steps=1, use_target_network=True)
    for method in (full, lora):
        method.to_device(torch.device("meta"))
        tensors = [p for net in method.networks() for p in net.parameters()]
        tensors += [t for obj in method.checkpoint_objects() for t in obj.state_dict().values()]
        assert tensors and all(t.device.type == "meta" for t in tensors)
        assert method.teacher.pipe.vae.device.type == "meta" and method.teacher.pipe.text_encoder.device.type == "meta"


def test_lcm_resume_reproduces_uninterrupted_run(random_teachers, tmp_path):
    from safetensors.torch import load_file

    train(random_teachers / "sd", tmp_path / "a", max_train_steps=4, use_target_network=True)
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=2, use_target_network=True, checkpoints_total_limit=None)
    # continue the same 4-step run from its step-2 checkpoint (same LR schedule as the straight run)
    import shutil

    shutil.rmtree(tmp_path / "b" / "lora")
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=4, use_target_network=True, resume_from_checkpoint="latest")
    a = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lcm_with_adversarial_term_trains_the_heads_and_resumes_exactly(random_teachers, tmp_path):
    from safetensors.torch import load_file

    options = dict(use_target_network=True, adversarial_weight=0.5, disc_hidden=8)
    method = train(random_teachers / "sd", tmp_path / "a", max_train_steps=4, **options)
    assert method.adversarial is not None
    before = method.adversarial.heads  # trained in place: its first layer moved from the seeded initialisation
    torch.manual_seed(1)
    fresh = type(before)([h.body[0].in_channels for h in before.heads], before.cond[0].in_features - before.noise_dim,
                         1000, hidden=8)
    assert not torch.equal(fresh.heads[0].logit.weight, before.heads[0].logit.weight)
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=2, checkpoints_total_limit=None, **options)
    import shutil

    shutil.rmtree(tmp_path / "b" / "lora")
    train(random_teachers / "sd", tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest", **options)
    for name in ("lora/pytorch_lora_weights.safetensors", "checkpoint-4/model_1.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("overrides,match", [
    (dict(w_min=5.0, w_max=2.0), "w_min=5.0, w_max=2.0"),
    (dict(lora_rank=0), "lora_rank=0 must be at least 1"),
    (dict(num_ddim_timesteps=0), "num_ddim_timesteps=0 is out of range"),
])
def test_bad_lcm_options(overrides, match):
    with pytest.raises(ConfigError, match=match):
        LCMConfig(**overrides).validate()


def test_two_process_cpu_run_equals_one_process_run(random_teachers, tmp_path):
    """2 gloo processes x batch 2, launched as the README says (accelerate with the shipped two-process CPU
    config), give the 1-process batch-4 result (same noise, synced grads), with the student's pass folded
    through the DDP wrapper (the branched pass runs in two processes in the resume test below)."""
    from safetensors.torch import load_file

    from method_runs import one_and_two_process_losses

    options = ["--max_train_steps", "3", "--lora_rank", "4", "--lora_forward", "folded"]
    loss_one, losses_two = one_and_two_process_losses("train_lcm.py", random_teachers / "sd", options, tmp_path, port=29533,
                                                      launcher="accelerate")
    assert len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * max(1.0, abs(loss_one)) for x in losses_two)
    a = load_file(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors")
    # Adam turns float-order differences of near-zero gradients into updates of up to ~lr / 10; a wrong batch
    # split or unsynchronised gradients move weights by ~lr per step instead.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-4


def test_a_one_process_checkpoint_resumes_in_two_processes_on_the_same_schedule(random_teachers, tmp_path):
    """A checkpoint written by one process continues in two (same global batch) and ends where the straight
    one-process run ends. The LR schedule is counted in optimizer steps: with accelerate's default (once per
    process) a linear decay resumed in two processes ended at 6 of 8 scheduler steps, at lr 2.5e-5, not 0."""
    import shutil
    import sys

    from method_runs import apart_over_moved, script_command, run_ok, two_process_launch
    from safetensors.torch import load_file

    script, options = script_command("train_lcm.py", random_teachers / "sd", tmp_path,
                                               ["--lora_rank", "4", "--checkpointing_steps", "2", "--lr_scheduler", "linear",
                                                "--checkpoints_total_limit", "3"])
    run_ok([sys.executable, script, *options, "--train_batch_size", "4", "--output_dir", str(tmp_path / "straight"),
            "--max_train_steps", "4"])
    (tmp_path / "moved").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "moved" / "checkpoint-2")
    resumed = run_ok([*two_process_launch("accelerate", 29536), script, *options, "--train_batch_size", "2",
                      "--output_dir", str(tmp_path / "moved"), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert resumed.stdout.count("done: lcm") == 2
    schedules = [torch.load(tmp_path / run / "checkpoint-4" / "scheduler.bin", weights_only=True) for run in ("straight", "moved")]
    assert [s["last_epoch"] for s in schedules] == [4, 4] and schedules[0]["_last_lr"] == schedules[1]["_last_lr"] == [0.0]
    weights = "lora/pytorch_lora_weights.safetensors"
    straight, moved = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "moved" / weights)
    at_step_2 = {"unet." + k.replace(".default", ""): v  # the checkpoint's peft names in the export's form
                 for k, v in load_file(tmp_path / "moved" / "checkpoint-2" / "model.safetensors").items()}
    assert at_step_2.keys() == straight.keys() and apart_over_moved(straight, moved, at_step_2) < 0.02


@pytest.mark.parametrize("options", [dict(use_target_network=True), dict(use_target_network=False),
                                     dict(use_lora=False), dict(use_target_network=True, adversarial_weight=0.5, disc_hidden=8),
                                     dict(use_target_network=True, lora_forward="folded"),
                                     dict(use_target_network=False, lora_forward="folded")],
                         ids=["lora-ema-target", "lora-self-target", "full", "lora-adversarial", "folded-ema-target",
                              "folded-self-target"])
def test_side_thread_overlap_gives_the_sequential_result(random_teachers, tmp_path, options):
    """--overlap_teacher runs the teacher and target passes on a second thread; the numbers must not change.
    Both runs compute every pass single-threaded (the overlapped run splits 2 threads into 1 + 1), so even the
    floating-point reduction order is the same and the results are bitwise equal."""
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    runs = {}
    try:
        for overlap in (False, True):
            method = train(random_teachers / "sd", tmp_path / str(overlap), max_train_steps=4, overlap_teacher=overlap,
                           ema_decay=0.5, num_threads=2 if overlap else 1, **options)
            assert (method.side_net is not None) == (overlap and method.cfg.use_lora)
            assert torch.get_num_threads() == threads  # the side thread and the loop gave the threads back
            if overlap:  # outside the loop (probes, tests) compute_loss stays sequential and leaves threads alone
                from stepdistill.training.step_random import StepRandom

                batch = method.make_batch([0, 1], torch.device("cpu"))
                method.compute_loss(method.student_net, batch, StepRandom(0, 0, 0, 1, 2, torch.device("cpu")))
                assert method.side is None and torch.get_num_threads() == threads
            name = "lora/pytorch_lora_weights.safetensors" if method.cfg.use_lora else "pipeline/unet/diffusion_pytorch_model.safetensors"
            runs[overlap] = load_file(tmp_path / str(overlap) / name)
            if method.target_adapter is not None:
                runs[overlap].update({"ema." + k: v for k, v in method.target_adapter.state_dict().items()})
    finally:
        torch.set_num_threads(threads)
    assert runs[False].keys() == runs[True].keys()
    assert all(torch.equal(runs[True][key], value) for key, value in runs[False].items())


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_loaded_lora_student_is_fused_without_peft_layers_and_keeps_the_numbers(random_teachers, tmp_path, kind):
    """Latency rows load LoRA students as deployed: fused, then the peft wrappers unloaded."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.evaluation.generate import load_student

    method = train(random_teachers / kind, tmp_path / "run")
    student = load_student(f"s={tmp_path / 'run' / 'lora'}", random_teachers / kind, {})
    net = student.pipe.unet if kind == "sd" else student.pipe.transformer
    assert not any(isinstance(m, LoraLayer) for m in net.modules())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, embeds = torch.tensor([999, 500]), method.teacher.encode_prompts(["rocket", "sun"])
    with torch.no_grad():
        trained = method.teacher.with_model(method.student_net).predict(x, t, embeds).eps
        loaded = method.teacher.with_model(net).predict(x, t, embeds).eps
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("use_target_network", [False, True], ids=["self-target", "ema-target"])
def test_folded_lora_forward_trains_as_the_branched_one(random_teachers, tmp_path, use_target_network):
    """--lora_forward folded changes how each pass is computed, not what: the same run ends on the same adapter,
    up to float-order noise (a fold that dropped the adapter's scale or its gradient ends far apart)."""
    from safetensors.torch import load_file

    from method_runs import apart_over_moved, build_method

    options = dict(max_train_steps=6, use_target_network=use_target_network, ema_decay=0.5, learning_rate=1e-3,
                   w_min=2.0, w_max=6.0)
    start = {"unet." + name.replace(".default", ""): p.detach().clone()
             for name, p in build_method(LCMConfig, LCMMethod, random_teachers / "sd", tmp_path / "start",
                                         **options).student_net.named_parameters() if p.requires_grad}
    runs = {}
    for forward in ("branched", "folded"):
        train(random_teachers / "sd", tmp_path / forward, lora_forward=forward, **options)
        runs[forward] = load_file(tmp_path / forward / "lora" / "pytorch_lora_weights.safetensors")
    assert runs["branched"].keys() == start.keys()
    assert apart_over_moved(runs["branched"], runs["folded"], start) < 0.02
