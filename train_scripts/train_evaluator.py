"""Train the testbed evaluator (emoji32 classifier with augmentations) through the shared loop.

    python train_scripts/train_evaluator.py --config configs/evaluator.yaml
    cp runs/evaluator/evaluator/emoji_evaluator.safetensors stepdistill/evaluation/assets/
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


from stepdistill.config import parse_cli, to_dict
from stepdistill.data import load_dataset
from stepdistill.errors import cli_errors
from stepdistill.evaluation.emoji_evaluator import EvaluatorMethod, held_out_accuracy
from stepdistill.training.loop import LoopConfig, run_training


@dataclass
class EvaluatorConfig(LoopConfig):
    """Loop options plus the evaluator's data."""

    dataset: str | None = None  # emoji32 (default) or another dataset; one class per image


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(EvaluatorConfig, argv)
    method = EvaluatorMethod(load_dataset(cfg.dataset), seed=cfg.seed)
    logs = run_training(method, cfg, tracker_config=to_dict(cfg))
    accuracy = held_out_accuracy(method.model, method.pixels, seed=123_456)
    print(f"done: final loss {logs['loss']:.4f}; held-out augmented top-1 {accuracy:.4f}; "
          f"weights in {cfg.output_dir}/{method.export_name}")


if __name__ == "__main__":
    sys.exit(main())
