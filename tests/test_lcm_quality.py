"""LCM-LoRA on the shipped testbed teacher: the loss falls and the 4-step student beats the teacher's own
4-step DDIM at reproducing the teacher's 50-step images (same prompts, same noise)."""
from __future__ import annotations

import torch

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.methods.common import LatentPromptData, adapters_disabled
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.sampling import decode, initial_noise, sample_latents
from stepdistill.teacher import load_teacher
from stepdistill.testbed import shipped_teacher_path
from stepdistill.training.loop import run_training
from stepdistill.training.step_random import StepRandom

STEPS = 200


def fixed_batch_loss(method: LCMMethod, model: torch.nn.Module) -> float:
    """LCM loss on the same 64 examples and noise, averaged over 4 draws (a held-out-style probe)."""
    losses = []
    with torch.no_grad():
        for draw in range(4):
            batch = method.make_batch(list(range(draw * 64, draw * 64 + 64)), torch.device("cpu"))
            losses.append(method.compute_loss(model, batch, StepRandom(99, draw, 0, 1, 64, torch.device("cpu")))[0].item())
    return sum(losses) / len(losses)


def test_lcm_lora_improves_few_step_student(tmp_path):
    teacher = load_teacher(shipped_teacher_path("tiny-sd"))
    cfg = LCMConfig(pretrained_teacher_model="tiny-sd", output_dir=str(tmp_path / "run"), max_train_steps=STEPS,
                    train_batch_size=32, learning_rate=5e-4, lr_warmup_steps=20, report_to="none", validation_steps=0,
                    checkpointing_steps=STEPS, w_min=3.0, w_max=3.0)
    method = LCMMethod(cfg, teacher, LatentPromptData(teacher, load_emoji32()))
    before = fixed_batch_loss(method, method.student_net)
    run_training(method, cfg)
    after = fixed_batch_loss(method, method.student_net)
    assert after < 0.8 * before, (before, after)

    captions = load_emoji32().captions
    prompts = [captions[i] for i in range(5, len(captions), 87)]  # 16 prompts
    noise = initial_noise(teacher, len(prompts), seed=1)
    with adapters_disabled(method.student_net, True):  # the teacher is the base network
        reference = decode(teacher, sample_latents(teacher, prompts, 50, 4.0, noise, spacing="leading"))
        teacher_4 = decode(teacher, sample_latents(teacher, prompts, 4, 4.0, noise))
    student_4 = decode(teacher, method.sample(method.student_net, prompts, 4, noise))
    err_teacher = (teacher_4 - reference).pow(2).mean().item()
    err_student = (student_4 - reference).pow(2).mean().item()
    assert err_student < err_teacher, (err_student, err_teacher)

