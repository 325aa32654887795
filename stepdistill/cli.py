"""``stepdistill`` command line: ``sample`` draws a prompt grid from a teacher; ``demo`` serves the Gradio demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stepdistill.errors import ConfigError, cli_errors
from stepdistill.testbed.teacher_training import VALIDATION_PROMPTS


def _sample(args: argparse.Namespace) -> None:
    from stepdistill.sampling import decode, initial_noise, sample_latents
    from stepdistill.teacher import load_teacher
    from stepdistill.testbed import resolve_teacher_path
    from stepdistill.utils.images import save_grid

    for name in ("steps", "seeds", "scale"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} is not allowed; it must be at least 1")
    if args.guidance_scale < 0:
        raise ConfigError(f"--guidance_scale {args.guidance_scale} is not allowed; it must be 0 or more")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give a .png file path")
    teacher = load_teacher(resolve_teacher_path(args.teacher), max_sequence_length=args.max_sequence_length)
    prompts = args.prompts or VALIDATION_PROMPTS
    rows = []
    for seed in range(args.seeds):
        latents = sample_latents(teacher, prompts, args.steps, args.guidance_scale, initial_noise(teacher, len(prompts), seed))
        rows.append(decode(teacher, latents))
    path = save_grid(torch.cat(rows), args.out, nrow=len(prompts), scale=args.scale)
    print(f"wrote {path} ({args.seeds} seeds x {len(prompts)} prompts, {args.steps} steps, guidance {args.guidance_scale})")


def _demo(args: argparse.Namespace) -> None:
    from stepdistill.errors import ConfigError

    try:
        from stepdistill.demo.app import launch
    except ImportError as error:
        raise ConfigError(f"the demo needs gradio ({error.name} is missing); pip install -e '.[demo]'") from None
    from stepdistill.demo.backend import DemoBackend, find_latest_student

    students = args.student
    if students is None:
        backend_class = _teacher_class(args.teacher)
        latest = find_latest_student(args.runs_dir, backend_class) if Path(args.runs_dir).is_dir() else None
        students = [str(latest)] if latest else []
    backend = DemoBackend(args.teacher, students, args.max_sequence_length, args.decoder)
    print(f"demo: teacher {args.teacher}, students {[s.name for s in backend.students]}; http://{args.host}:{args.port}")
    launch(backend, args.host, args.port, args.max_queue)


def _teacher_class(teacher: str) -> str:
    import json

    from stepdistill.testbed import resolve_teacher_path

    return json.loads((resolve_teacher_path(teacher) / "model_index.json").read_text()).get("_class_name", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="few-step diffusion distillation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="sample a prompt grid from a teacher pipeline folder")
    sample.add_argument("--teacher", default="tiny-sd", help="'tiny-sd', 'tiny-sd3' or a pipeline folder")
    sample.add_argument("--prompts", nargs="*", help="prompts (default: the validation prompts)")
    sample.add_argument("--steps", type=int, default=50, help="solver steps")
    sample.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance scale")
    sample.add_argument("--seeds", type=int, default=2, help="rows of the grid, one seed each")
    sample.add_argument("--max_sequence_length", type=int, default=8, help="T5 tokens per prompt of SD3, PixArt and Flux teachers (testbed DiT: 8)")
    sample.add_argument("--scale", type=int, default=3, help="pixel upscaling of the PNG")
    sample.add_argument("--out", default="samples.png", help="output PNG path")
    sample.set_defaults(run=_sample)
    demo = sub.add_parser("demo", help="Gradio page: the teacher beside its students at 1, 2, 4, 8 steps, timed")
    demo.add_argument("--teacher", default="tiny-sd", help="'tiny-sd', 'tiny-sd3' or a pipeline folder")
    demo.add_argument("--student", action="append", help="student LoRA or pipeline folder, or name=folder; repeatable "
                      "(default: the newest student under --runs_dir that fits the teacher)")
    demo.add_argument("--runs_dir", default="runs", help="where to look for the newest student")
    demo.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    demo.add_argument("--port", type=int, default=7860, help="port")
    demo.add_argument("--max_queue", type=int, default=64, help="requests waiting at most; more are refused")
    demo.add_argument("--max_sequence_length", type=int, default=8, help="T5 tokens per prompt of SD3, PixArt and Flux teachers (testbed DiT: 8)")
    demo.add_argument("--decoder", help="an AutoencoderKL or AutoencoderTiny folder (e.g. a TAESD) that the teacher "
                      "and every student decode with instead of the pipeline's VAE")
    demo.set_defaults(run=_demo)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
