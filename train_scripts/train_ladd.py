"""Latent adversarial diffusion distillation (LADD) of a diffusers teacher into a 1-4 step student.

    accelerate launch train_scripts/train_ladd.py --config configs/ladd_lora_tiny_sd.yaml
    python train_scripts/train_ladd.py --config configs/ladd_lora_tiny_sd.yaml --max_train_steps 200

Generates and caches the teacher's synthetic latents, then trains the student against discriminator
heads on the frozen teacher's features. Writes checkpoints (student, heads, both optimizers), TensorBoard
logs, validation grids and the student (``lora/`` or ``pipeline/``) under ``--output_dir``.
"""
from __future__ import annotations

import sys

from stepdistill.errors import cli_errors
from stepdistill.methods.common import train_from_cli
from stepdistill.methods.ladd import LADDConfig, LADDMethod
from stepdistill.training.loop import final_loss_text


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, method, logs = train_from_cli(LADDConfig, LADDMethod, argv)
    print(f"done: ladd {final_loss_text(logs)}; student in {cfg.output_dir}/{method.export_name}")


if __name__ == "__main__":
    sys.exit(main())
