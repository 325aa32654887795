"""Progressive distillation (with optional guidance distillation) of a diffusers teacher.

    accelerate launch train_scripts/train_progressive.py --config configs/progressive_tiny_sd.yaml
    python train_scripts/train_progressive.py --config configs/progressive_tiny_sd.yaml --iterations_per_round 100

Writes checkpoints, TensorBoard logs, validation grids, one pipeline folder per round (``rounds/``) and the
final student (``pipeline/``) under ``--output_dir``.
"""
from __future__ import annotations

import sys

from stepdistill.errors import cli_errors
from stepdistill.methods.common import train_from_cli
from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod
from stepdistill.training.loop import final_loss_text


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, method, logs = train_from_cli(ProgressiveConfig, ProgressiveMethod, argv)
    print(f"done: progressive {final_loss_text(logs)}; {cfg.end_steps}-step student in "
          f"{cfg.output_dir}/{method.export_name}, every round in {cfg.output_dir}/rounds")


if __name__ == "__main__":
    sys.exit(main())
