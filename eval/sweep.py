"""Step sweep over teacher solvers and students on the offline testbed.

    python eval/sweep.py --teacher tiny-sd --students lcm_lora=runs/lcm_lora/lora --output_dir runs/sweep
    python eval/sweep.py --teacher tiny-sd3 --teacher_solvers euler,dpmpp --num_prompts 256 --seeds 0,1,2

Writes sweep.json, sweep.md, fid_vs_steps.png and grids/ under --output_dir.
"""
from __future__ import annotations

import sys

from stepdistill.config import parse_cli
from stepdistill.errors import cli_errors
from stepdistill.evaluation.sweep import SweepConfig, run_sweep


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SweepConfig, argv)
    rows = run_sweep(cfg)
    print(f"wrote {len(rows)} rows to {cfg.output_dir}/sweep.md")
    print(open(f"{cfg.output_dir}/sweep.md").read())


if __name__ == "__main__":
    sys.exit(main())
