"""LCM-LoRA on the shipped tiny-sd teacher: a short run must lower LCM's objective on a fixed batch and move
the 4-step student toward the 50-step CFG teacher, past the teacher's own 4-step DDIM with its shipped
scheduler config."""
from __future__ import annotations

import torch

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.methods.common import adapters_disabled
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.sampling import decode, initial_noise, sample_latents
from stepdistill.solvers import sample_ddim, sampling_grid
from stepdistill.teacher import load_teacher
from stepdistill.testbed import shipped_teacher_path
from stepdistill.training.loop import run_training

GUIDANCE = 4.0


def fixed_batch_objective(method: LCMMethod, data) -> float:
    """LCM's (Min-SNR weighted) objective on 64 fixed examples at 10 grid timesteps from 19 to 919, with the
    run's current target network: the loss training lowers, without the noise of random batches."""
    rows = torch.randperm(len(data.captions), generator=torch.Generator().manual_seed(5))[:64].tolist()
    x0, embeds = method.data.batch(rows, torch.device("cpu"))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    return method.fixed_batch_objective(method.student_net, x0, embeds, noise, method.grid[::5])


def test_short_lcm_lora_run_lowers_its_loss_and_beats_the_teachers_shipped_four_step_ddim(tmp_path):
    cfg = LCMConfig(pretrained_teacher_model="tiny-sd", output_dir=str(tmp_path / "run"), use_lora=True, lora_rank=16,
                    lora_alpha=16.0, loss_type="l2", snr_gamma=5.0, use_target_network=True, w_min=3.0, w_max=3.0,
                    max_train_steps=100, train_batch_size=32, learning_rate=8e-5, lr_warmup_steps=0, report_to="none",
                    validation_steps=0, checkpointing_steps=1000, lora_forward="folded")  # the shipped config's pass
    cfg.validate()
    teacher = load_teacher(shipped_teacher_path("tiny-sd"))
    data = load_emoji32()
    method = LCMMethod(cfg, teacher, LatentPromptData.from_images(teacher, data))
    prompts = [data.captions[i] for i in torch.linspace(0, len(data.captions) - 1, 32).long().tolist()]
    noise = initial_noise(teacher, len(prompts), seed=123)
    with adapters_disabled(method.student_net, True), torch.no_grad():
        reference = decode(teacher, sample_latents(teacher, prompts, 50, GUIDANCE, noise))
        embeds, uncond = teacher.encode_prompts(prompts), teacher.empty_prompt(len(prompts))
        # what `pipe(prompt, num_inference_steps=4)` gives with the teacher's own DDIMScheduler config
        shipped = teacher.pipe.scheduler.config
        grid = sampling_grid(teacher.schedule, 4, shipped.timestep_spacing, shipped.steps_offset)
        own_four = decode(teacher, sample_ddim(lambda x, t: teacher.predict(x, t, embeds, GUIDANCE, uncond=uncond),
                                               noise, grid, teacher.schedule))
    before = decode(teacher, method.sample(method.student_net, prompts, 4, noise, guidance_scale=GUIDANCE))
    objective_before = fixed_batch_objective(method, data)
    run_training(method, cfg)
    after = decode(teacher, method.sample(method.student_net, prompts, 4, noise, guidance_scale=GUIDANCE))
    objective_after = fixed_batch_objective(method, data)
    mse = lambda images: ((images - reference) ** 2).mean().item()  # noqa: E731
    # measured (100 steps at lr 8e-5; 200 at the config's 3e-5 end alike, 0.91x and 0.83x): after/own DDIM-4
    # 0.916, after/before 0.840, objective -8.1%
    assert mse(after) < 0.95 * mse(own_four), (mse(after), mse(own_four))
    assert mse(after) < 0.9 * mse(before), (mse(after), mse(before))
    assert objective_after < 0.96 * objective_before, (objective_after, objective_before)
