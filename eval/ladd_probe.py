"""Diagnostic: how the LADD student's few-step quality moves during training (not a test).

Trains through the shared loop and, every ``PROBE_EVERY`` steps, prints evaluator FID and top-1 alignment
of the student's 1, 2 and 4-step samples (256 prompts, fixed noise), and of its EMA when ``ema_decay`` is on.

    python eval/ladd_probe.py --config configs/ladd_lora_tiny_sd.yaml --output_dir runs/ladd_probe --max_train_steps 600
"""
from __future__ import annotations

import os
import sys
import time

import torch

from stepdistill.config import parse_cli
from stepdistill.data.emoji32 import load_emoji32
from stepdistill.errors import cli_errors
from stepdistill.evaluation.emoji_evaluator import load_evaluator
from stepdistill.evaluation.distances import fid_from_features
from stepdistill.evaluation.metrics import evaluator_outputs, topk_alignment
from stepdistill.methods.common import load_teacher_and_data
from stepdistill.methods.ladd import LADDConfig, LADDMethod
from stepdistill.sampling import decode, initial_noise
from stepdistill.training.loop import run_training

NUM_PROMPTS = 256
PROBE_EVERY = int(os.environ.get("PROBE_EVERY", "100"))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(LADDConfig, argv)
    teacher, data = load_teacher_and_data(cfg)
    method = LADDMethod(cfg, teacher, data)
    evaluator = load_evaluator()
    emoji = load_emoji32()
    rows = torch.linspace(0, len(emoji.captions) - 1, NUM_PROMPTS).round().long()
    prompts = [emoji.captions[i] for i in rows]
    real_features, _ = evaluator_outputs(evaluator, emoji.pixel_tensor())
    noise = initial_noise(teacher, NUM_PROMPTS, seed=123)
    started = time.time()

    def scores(model: torch.nn.Module) -> str:
        parts = []
        for steps in sorted(set(cfg.student_steps)):
            images = decode(teacher, method.sample(model, prompts, steps, noise))
            features, logits = evaluator_outputs(evaluator, images)  # FID against the whole dataset
            fid, top1 = fid_from_features(real_features, features), topk_alignment(logits, rows, 1)
            parts.append(f"{steps}-step FID {fid:.2f} top1 {top1:.3f}")
        return "; ".join(parts)

    def probe(model: torch.nn.Module, done: int) -> None:
        line = scores(model)
        if method.student_ema is not None:  # the weights the export would ship, beside the live ones
            with method.shipped_weights():
                line += " | EMA " + scores(model)
        print(f"step {done:5d} ({time.time() - started:5.0f} s): {line}", flush=True)

    if cfg.resume_from_checkpoint is None:  # a resumed run's weights load inside run_training, after this point
        probe(method.trainable_module(), 0)

    def on_step_end(model, done, out, accelerator) -> None:
        if done % PROBE_EVERY == 0:
            probe(accelerator.unwrap_model(model), done)

    method.on_step_end = on_step_end
    logs = run_training(method, cfg)
    print(f"final logs: {logs}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
