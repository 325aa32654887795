"""Shared by the trainer tests: a few-step run of a method on a random teacher and 16 emoji32 images."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.teacher import WEIGHT_DTYPES, load_teacher
from stepdistill.training.loop import run_training

ROOT = Path(__file__).resolve().parents[1]
FAST_RUN = dict(max_train_steps=3, train_batch_size=4, learning_rate=1e-2, lr_warmup_steps=0, report_to="none",
                validation_steps=0, checkpointing_steps=2, lora_rank=4, lora_alpha=8.0)


def small_data(count: int = 16):
    data = load_emoji32()
    data.images, data.captions = data.images[:count], data.captions[:count]
    return data


def build_method(config_cls: type, method_cls: type, teacher_dir: Path, out: Path, **options: Any):
    """``method_cls`` built from FAST_RUN plus ``options``, untrained (its student as training starts)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    base = {k: v for k, v in FAST_RUN.items() if k in fields}  # full-model trainers have no LoRA options
    cfg = config_cls(**{**base, "pretrained_teacher_model": str(teacher_dir), "output_dir": str(out), **options})
    cfg.validate()
    teacher = load_teacher(teacher_dir, dtype=WEIGHT_DTYPES[cfg.teacher_weight_dtype], max_sequence_length=8)
    return method_cls(cfg, teacher, LatentPromptData.from_images(teacher, small_data()))


def train_method(config_cls: type, method_cls: type, teacher_dir: Path, out: Path, **options: Any):
    """Build ``config_cls`` from FAST_RUN plus ``options``, train ``method_cls`` with it, return the method."""
    method = build_method(config_cls, method_cls, teacher_dir, out, **options)
    run_training(method, method.cfg)
    return method


def small_npz(folder: Path) -> Path:
    """``small_data()`` as a ``--dataset`` file for the training scripts."""
    data = small_data()
    path = folder / "small.npz"
    np.savez_compressed(path, images=data.images, captions=np.array(data.captions))
    return path


def script_command(script: str, teacher_dir: Path, out: Path, options: list[str]) -> tuple[str, list[str]]:
    """The path of ``train_scripts/<script>`` and the options the script-level tests share (the random teacher,
    ``small_npz`` data, no warm-up, no validation, one thread each) followed by ``options``."""
    return str(ROOT / "train_scripts" / script), [
        "--pretrained_teacher_model", str(teacher_dir), "--dataset", str(small_npz(out)), "--validation_steps", "0",
        "--report_to", "none", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--num_threads", "1", *options]


def two_process_launch(launcher: str, port: int) -> list[str]:
    """The command start for 2 gloo processes: ``torchrun``, or ``accelerate launch`` with the shipped CPU config."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    config = ROOT / "configs" / "accelerate" / "multi_cpu_2proc.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(port)]


def cpu_launch(config_name: str, port: int, folder: Path) -> list[str]:
    """The command start for 2 CPU processes under accelerate's FSDP or DeepSpeed path: the shipped config
    ``configs/accelerate/<config_name>`` cut down to one machine, two processes and no mixed precision, and
    ``accelerate_on_cpu.py`` in front of the script (it keeps accelerate on that path, which it would
    otherwise replace by DDP on a machine without GPUs)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "accelerate" / config_name).read_text())
    for key in ("machine_rank", "main_process_ip"):
        config.pop(key, None)
    config.update(num_machines=1, num_processes=2, mixed_precision="no", use_cpu=True)
    path = folder / f"cpu_2proc_{config_name}"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--main_process_port",
            str(port), str(ROOT / "tests" / "accelerate_on_cpu.py")]


def fsdp_launch(port: int, folder: Path) -> list[str]:
    """:func:`cpu_launch` with the shipped FSDP2 config."""
    return cpu_launch("fsdp_2node.yaml", port, folder)


def deepspeed_launch(port: int, folder: Path) -> list[str]:
    """:func:`cpu_launch` with the shipped DeepSpeed ZeRO-2 config."""
    return cpu_launch("deepspeed_zero2.yaml", port, folder)


def run_ok(command: list[str]) -> subprocess.CompletedProcess:
    """Run a training command, failing the test with its error output when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def one_and_launched_runs(script: str, teacher_dir: Path, options: list[str], out: Path,
                          launch: list[str]) -> tuple[float, list[float], list[str]]:
    """Run ``train_scripts/<script>`` on the random teacher and ``small_npz`` data, with the settings every
    distributed test shares (no warm-up, no validation, one thread each) plus ``options``: as 1 process x batch 4
    (into out/one) and as 2 processes x batch 2 started by ``launch`` (into out/two). Returns the single run's
    final loss, each launched process's, and the launched command without its output folder (for more runs)."""
    script, options = script_command(script, teacher_dir, out, options)
    single = run_ok([sys.executable, script, *options, "--output_dir", str(out / "one"), "--train_batch_size", "4"])
    command = [*launch, script, *options, "--train_batch_size", "2"]
    double = run_ok([*command, "--output_dir", str(out / "two")])
    loss_one = float(single.stdout.split("final loss ")[1].split(";")[0])
    return loss_one, [float(part.split(";")[0]) for part in double.stdout.split("final loss ")[1:]], command


def one_and_two_process_losses(script: str, teacher_dir: Path, options: list[str], out: Path, port: int,
                               launcher: str = "torchrun") -> tuple[float, list[float]]:
    """:func:`one_and_launched_runs` as 2 gloo processes started by ``torchrun`` or by ``accelerate launch``
    with the shipped two-process CPU config; returns the single run's final loss and each process's."""
    loss_one, losses_two, _ = one_and_launched_runs(script, teacher_dir, options, out, two_process_launch(launcher, port))
    return loss_one, losses_two


def apart_over_moved(one: dict, two: dict, start: dict) -> float:
    """How far two runs' weights are apart, as a share of how far training moved the first from ``start``
    (summed over the whole network; keys ``start`` lacks, such as a new guidance embedding, are left out of both).
    Adam turns float-order noise in near-zero gradients into updates of up to lr, so single weights may differ
    between a one- and a two-process run; a wrong batch split or unsynced gradients give a share near 1."""
    moved = sum((one[k] - start[k]).abs().sum().item() for k in start)
    assert moved > 0
    return sum((one[k] - two[k]).abs().sum().item() for k in start) / moved
