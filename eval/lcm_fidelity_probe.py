"""Diagnostic: does LCM training move the few-step student toward the 50-step guided teacher?

Trains an LCM student with a plain Adam loop on the shipped testbed teacher and, every 100 steps, prints the
mean training loss, the objective on a fixed batch, and the latent / pixel MSE between the student's 1, 2 and 4-step samples and the teacher's
50-step DDIM samples (same prompts, same initial noise), next to the teacher's own 4-step DDIM
(trailing and the shipped config's leading spacing); with a target network, its samples too. Used to tune the LCM trainer; not a test.

    python eval/lcm_fidelity_probe.py --learning_rate 1e-4 --max_train_steps 600
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from stepdistill.config import parse_cli
from stepdistill.data.emoji32 import load_emoji32
from stepdistill.errors import cli_errors
from stepdistill.methods.common import adapters_disabled
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.sampling import decode, initial_noise, sample_latents
from stepdistill.solvers import sample_ddim, sampling_grid
from stepdistill.teacher import load_teacher
from stepdistill.testbed import resolve_teacher_path
from stepdistill.training.step_random import StepRandom, batch_indices

NUM_PROMPTS = 32
GUIDANCE = 4.0


def _distances(teacher, a: torch.Tensor, b: torch.Tensor) -> str:
    latent = ((a - b) ** 2).mean().item()
    pixel = ((decode(teacher, a) - decode(teacher, b)) ** 2).mean().item()
    return f"latent {latent:.4f} pixel {pixel:.4f}"


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(LCMConfig, argv)
    teacher = load_teacher(resolve_teacher_path(cfg.pretrained_teacher_model), max_sequence_length=cfg.max_sequence_length)
    data = LatentPromptData.from_images(teacher, load_emoji32())
    method = LCMMethod(cfg, teacher, data)
    model = method.trainable_module()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    captions = load_emoji32().captions
    prompts = [captions[i] for i in torch.linspace(0, len(captions) - 1, NUM_PROMPTS).long().tolist()]
    noise = initial_noise(teacher, NUM_PROMPTS, seed=123)
    with adapters_disabled(model, cfg.use_lora), torch.no_grad():
        reference = sample_latents(teacher, prompts, 50, GUIDANCE, noise)
        embeds, uncond = teacher.encode_prompts(prompts), teacher.empty_prompt(NUM_PROMPTS)
        for spacing, offset in (("trailing", 0), ("leading", 1)):
            grid = sampling_grid(teacher.schedule, 4, spacing, offset)
            ddim4 = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, GUIDANCE, uncond=uncond), noise, grid, teacher.schedule)
            print(f"teacher DDIM-4 ({spacing}) vs teacher-50: {_distances(teacher, ddim4, reference)}", flush=True)

    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(5))[:64].tolist()
    fixed_x0, fixed_embeds = data.batch(rows, torch.device("cpu"))
    fixed_noise = torch.randn(fixed_x0.shape, generator=torch.Generator().manual_seed(6))

    def probe(step: int) -> None:
        model.eval()
        objective = method.fixed_batch_objective(model, fixed_x0, fixed_embeds, fixed_noise, method.grid[::5])
        print(f"step {step} objective on a fixed batch (64 examples x 10 timesteps): {objective:.6f}", flush=True)
        target = method.target_model()
        nets = {"student": model} if target is model else {"student": model, "EMA target": target}
        for name, net in nets.items():
            for k in (1, 2, 4):
                student = method.sample(net, prompts, k, noise, guidance_scale=GUIDANCE)
                print(f"step {step} {name} {k}-step vs teacher-50: {_distances(teacher, student, reference)}", flush=True)
        model.train()

    probe(0)
    losses, start = [], time.time()
    for step in range(cfg.max_train_steps):
        batch = method.make_batch(batch_indices(len(data), cfg.train_batch_size, step, cfg.seed, 0, cfg.train_batch_size),
                                  torch.device("cpu"))
        loss, _ = method.compute_loss(model, batch, StepRandom(cfg.seed, step, 0, 1, cfg.train_batch_size, torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        method.after_optimizer_step(model)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} mean loss of last 100: {statistics.mean(losses[-100:]):.4f} ({time.time() - start:.0f} s)")
            probe(step + 1)


if __name__ == "__main__":
    sys.exit(main())
