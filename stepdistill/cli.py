"""``stepdistill`` command line: ``stepdistill sample`` draws a prompt grid from a teacher."""
from __future__ import annotations

import argparse
import sys

import torch

from stepdistill.errors import cli_errors
from stepdistill.testbed.teacher_training import VALIDATION_PROMPTS


def _sample(args: argparse.Namespace) -> None:
    from stepdistill.sampling import decode, initial_noise, sample_latents
    from stepdistill.teacher import load_teacher
    from stepdistill.testbed import resolve_teacher_path
    from stepdistill.utils.images import save_grid

    teacher = load_teacher(resolve_teacher_path(args.teacher), max_sequence_length=args.max_sequence_length)
    prompts = args.prompts or VALIDATION_PROMPTS
    rows = []
    for seed in range(args.seeds):
        latents = sample_latents(teacher, prompts, args.steps, args.guidance_scale, initial_noise(teacher, len(prompts), seed))
        rows.append(decode(teacher, latents))
    path = save_grid(torch.cat(rows), args.out, nrow=len(prompts), scale=args.scale)
    print(f"wrote {path} ({args.seeds} seeds x {len(prompts)} prompts, {args.steps} steps, guidance {args.guidance_scale})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="few-step diffusion distillation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="sample a prompt grid from a teacher pipeline folder")
    sample.add_argument("--teacher", default="tiny-sd", help="'tiny-sd', 'tiny-sd3' or a pipeline folder")
    sample.add_argument("--prompts", nargs="*", help="prompts (default: the validation prompts)")
    sample.add_argument("--steps", type=int, default=50, help="solver steps")
    sample.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance scale")
    sample.add_argument("--seeds", type=int, default=2, help="rows of the grid, one seed each")
    sample.add_argument("--max_sequence_length", type=int, default=8, help="SD3 zero-T5 tokens (testbed: 8)")
    sample.add_argument("--scale", type=int, default=3, help="pixel upscaling of the PNG")
    sample.add_argument("--out", default="samples.png", help="output PNG path")
    sample.set_defaults(run=_sample)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
