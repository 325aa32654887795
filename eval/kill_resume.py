"""Reliability benchmark: SIGKILL every trainer at random points, resume with ``latest``, compare weights.

For each trainer, one uninterrupted run and one run that is killed (SIGKILL, no chance to clean up) at
``--kills`` random moments: shortly after a random checkpoint appears, often in the middle of the next
save. After every kill the output folder is checked (no half-written checkpoint or export under its final
name; every checkpoint loads), then the run is resumed with ``--resume_from_checkpoint latest``. The
final exported weights must equal the uninterrupted run's bit for bit.

    python eval/kill_resume.py --kills 5 --work_dir runs/kill_resume
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


@dataclass
class TrainerCase:
    """How to start one trainer on the tiny random testbed, and which exported file holds its weights."""

    name: str
    script: str
    args: list[str]
    weights: str


def trainer_cases(teachers: Path, dataset: Path) -> list[TrainerCase]:
    """The four trainers with small, fast, deterministic settings (checkpoint after every step)."""
    common = ["--dataset", str(dataset), "--train_batch_size", "4", "--checkpointing_steps", "1", "--validation_steps", "0",
              "--report_to", "none", "--num_threads", "1", "--lr_warmup_steps", "0", "--checkpoints_total_limit", "2"]
    sd = ["--pretrained_teacher_model", str(teachers / "sd")]
    return [
        TrainerCase("lcm", "train_lcm.py", [*common, *sd, "--max_train_steps", str(STEPS), "--lora_rank", "4",
                                            "--use_target_network", "true", "--learning_rate", "1e-3"],
                    "lora/pytorch_lora_weights.safetensors"),
        TrainerCase("progressive", "train_progressive.py", [*common, *sd, "--start_steps", "4", "--end_steps", "1",
                                                            "--iterations_per_round", str(STEPS // 2), "--learning_rate", "1e-3"],
                    "pipeline/unet/diffusion_pytorch_model.safetensors"),
        TrainerCase("ladd", "train_ladd.py", [*common, *sd, "--max_train_steps", str(STEPS), "--lora_rank", "4",
                                              "--synthetic_steps", "2", "--disc_hidden", "8", "--distill_weight", "0.5",
                                              "--learning_rate", "1e-3"],
                    "lora/pytorch_lora_weights.safetensors"),
        TrainerCase("teacher", "train_teacher.py", [*common, "--stage", "denoiser", "--kind", "sd", "--vae_path", str(teachers / "sd" / "vae"),
                                                    "--max_train_steps", str(STEPS), "--learning_rate", "1e-3"],
                    "pipeline/unet/diffusion_pytorch_model.safetensors"),
    ]


def _command(case: TrainerCase, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train_scripts" / case.script), *case.args, "--output_dir", str(out)]
    return cmd + (["--resume_from_checkpoint", "latest"] if resume else [])


def _completed_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "stepdistill_checkpoint.json").is_file())


def run_and_kill(cmd: list[str], out: Path, after_checkpoint: int, delay: float, timeout: float = 600) -> bool:
    """Start ``cmd``; SIGKILL it ``delay`` s after checkpoint ``after_checkpoint`` appears. True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if (out / f"checkpoint-{after_checkpoint}").is_dir():
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        raise TimeoutError(f"{cmd[1]} did not reach checkpoint-{after_checkpoint} in {timeout} s")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed before it could be killed: {proc.stderr.read()[-2000:]}")
    return False


def check_folder(out: Path, case: TrainerCase) -> None:
    """Nothing half-written under a final name: every checkpoint has its marker and loadable weights, and an
    export, if present, is complete."""
    for ckpt in out.glob("checkpoint-*"):
        if not (ckpt / "stepdistill_checkpoint.json").is_file():
            raise AssertionError(f"{ckpt} exists without its completion marker")
        for weights in ckpt.glob("*.safetensors"):
            load_file(weights)
    export = out / case.weights.split("/")[0]
    if export.exists():
        load_file(out / case.weights)


def run_case(case: TrainerCase, work: Path, kills: int, rng: random.Random) -> dict:
    """One uninterrupted run, one run killed ``kills`` times; returns what happened."""
    straight = work / f"{case.name}-straight"
    subprocess.run(_command(case, straight, resume=False), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_dir = work / f"{case.name}-killed"
    points, survived = [], 0
    for i in range(kills):
        done = _completed_checkpoints(killed_dir)
        last = done[-1] if done else 0
        if last >= STEPS - 1:
            break
        after = min(last + rng.randint(1, 2), STEPS - 1)
        delay = rng.uniform(0.0, 0.3)
        was_killed = run_and_kill(_command(case, killed_dir, resume=i > 0), killed_dir, after, delay)
        mid_write = any(p.name.startswith(".tmp-") for p in killed_dir.iterdir())  # died while saving
        done = _completed_checkpoints(killed_dir)
        points.append({"after_checkpoint": after, "delay_s": round(delay, 3), "killed": was_killed,
                       "resumes_from": done[-1] if done else 0, "killed_mid_write": mid_write})
        check_folder(killed_dir, case)
        survived += was_killed
        if not was_killed:
            break
    subprocess.run(_command(case, killed_dir, resume=True), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a, b = load_file(straight / case.weights), load_file(killed_dir / case.weights)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"trainer": case.name, "kills": survived, "mid_write_kills": sum(p["killed_mid_write"] for p in points),
            "points": points, "bitwise_identical": identical}


def make_testbed(work: Path) -> tuple[Path, Path]:
    """Tiny random SD pipeline and a 16-image .npz dataset, written under ``work``."""
    from stepdistill.data.emoji32 import load_emoji32
    from stepdistill.testbed import tiny_models
    from stepdistill.testbed.teacher_training import build_pipeline
    from stepdistill.testbed.tokenizer import write_caption_tokenizer

    data = load_emoji32()
    captions = data.captions[:16]
    np.savez_compressed(work / "small.npz", images=data.images[:16], captions=np.array(captions))
    torch.manual_seed(0)
    pipe = build_pipeline("sd", tiny_models.tiny_vae(), write_caption_tokenizer(captions, work / "tok"))
    pipe.save_pretrained(work / "teachers" / "sd")
    return work / "teachers", work / "small.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per trainer")
    parser.add_argument("--trainers", default="lcm,progressive,ladd,teacher", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="runs/kill_resume")
    args = parser.parse_args()
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"error: work_dir={str(work)!r} is not empty; give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    teachers, dataset = make_testbed(work)
    rng = random.Random(args.seed)
    wanted = args.trainers.split(",")
    results = [run_case(c, work, args.kills, rng) for c in trainer_cases(teachers, dataset) if c.name in wanted]
    for r in results:
        print(f"{r['trainer']:12s} kills survived {r['kills']} ({r['mid_write_kills']} while writing a checkpoint or export), "
              f"final weights bitwise identical: {r['bitwise_identical']}")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not all(r["bitwise_identical"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
