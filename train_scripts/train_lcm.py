"""Latent consistency distillation (LCM and LCM-LoRA) of a diffusers teacher.

    accelerate launch train_scripts/train_lcm.py --config configs/lcm_lora_tiny_sd.yaml
    python train_scripts/train_lcm.py --config configs/lcm_lora_tiny_sd.yaml --max_train_steps 200

Writes checkpoints, TensorBoard logs, validation grids at 1/2/4/8 steps and the student (``lora/`` in
diffusers format, or ``pipeline/``) under ``--output_dir``.
"""
from __future__ import annotations

import sys

from stepdistill.errors import cli_errors
from stepdistill.methods.common import train_from_cli
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.training.loop import final_loss_text


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, method, logs = train_from_cli(LCMConfig, LCMMethod, argv)
    print(f"done: lcm {final_loss_text(logs)}; student in {cfg.output_dir}/{method.export_name}")


if __name__ == "__main__":
    sys.exit(main())
