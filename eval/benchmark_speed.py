"""Speed benchmark: training throughput, step-time split and peak memory per trainer; sampling latency;
and LCM-LoRA against diffusers' reference script on the same teacher, batch and machine.

    python eval/benchmark_speed.py --output_dir runs/bench_speed
    python eval/benchmark_speed.py --parts reference --reference_script path/to/train_lcm_distill_lora_sd_wds.py

Each training measurement runs in its own process (so peak memory is its own): ``--measure_steps`` steps
are timed after ``--warmup_steps``. The reference comparison times both scripts the same way, from their own
tqdm progress bar (when the redraws of the warm-up step and of the last step arrive), with the same batch,
LoRA rank, solver grid, loss and guidance range, at the teacher VAE's resolution; its peak memory is each
main process's max RSS and, since the reference decodes images in a data-loader worker process, the peak PSS
of each whole process tree, plus on a CUDA machine the GPU memory nvidia-smi shows for each tree. The one
change made to a copy of the reference script is the length of its unconditional prompt (hard-coded 77
tokens; the testbed's text encoder takes 32). The reference script is not shipped: take
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` from the diffusers repository at the
installed version (needs ``webdataset``, ``braceexpand`` and ``torchvision``).
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
TRAINER_CONFIGS = {"lcm": "lcm_lora_tiny_sd.yaml", "progressive": "progressive_tiny_sd.yaml", "ladd": "ladd_lora_tiny_sd.yaml"}


# --- one trainer in this process ---------------------------------------------------------------------------
def measure_trainer(trainer: str, out: Path, batch: int, warmup: int, steps: int, teacher: str,
                    extra: list[str] | None = None) -> dict:
    """Train ``warmup + steps`` steps with the trainer's shipped config; time the last ``steps``."""
    import resource

    import torch

    from stepdistill.config import parse_cli
    from stepdistill.methods.common import load_teacher_and_data
    from stepdistill.training.loop import run_training
    from stepdistill.training.timing import STEP_TIMER

    total = warmup + steps
    argv = ["--config", str(ROOT / "configs" / TRAINER_CONFIGS[trainer]), "--pretrained_teacher_model", teacher,
            "--output_dir", str(out), "--overwrite_output_dir", "--train_batch_size", str(batch), "--report_to", "none",
            "--validation_steps", "0", "--checkpointing_steps", "100000"]
    if trainer == "progressive":
        from stepdistill.methods.progressive import ProgressiveConfig as Config, ProgressiveMethod as Method
        argv += ["--start_steps", "32", "--end_steps", "16", "--iterations_per_round", str(total)]
    elif trainer == "ladd":
        from stepdistill.methods.ladd import LADDConfig as Config, LADDMethod as Method
        argv += ["--max_train_steps", str(total), "--synthetic_steps", "2"]  # the cache's quality does not change step time
    else:
        from stepdistill.methods.lcm import LCMConfig as Config, LCMMethod as Method
        argv += ["--max_train_steps", str(total)]
    cfg = parse_cli(Config, argv + (extra or []))
    teacher_wrapper, data = load_teacher_and_data(cfg)
    method = Method(cfg, teacher_wrapper, data)
    marks: dict[int, float] = {}

    def on_step_end(model, done, out_dir, accelerator) -> None:
        marks[done] = time.perf_counter()
        if done == warmup:
            STEP_TIMER.reset(enabled=True)
            if torch.cuda.is_available():  # the peak of the training steps, not of encoding the dataset
                torch.cuda.reset_peak_memory_stats()

    method.on_step_end = on_step_end
    run_training(method, cfg)
    seconds = (marks[total] - marks[warmup]) / steps
    split = {k: v / steps for k, v in STEP_TIMER.totals.items()}
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None  # tensors, not the cache
    return {"trainer": trainer, "batch": batch, "s_per_step": seconds, "images_per_s": batch / seconds,
            "split_s_per_step": split, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": gpu}


# --- sampling latency --------------------------------------------------------------------------------------
def measure_sampling(teacher: str, students: list[str], steps: list[int], batch_sizes: list[int],
                     repeats: int = 5, max_sequence_length: int = 8, device: str = "cpu",
                     dtype: str = "fp32", compile_networks: bool = False,
                     decoder: str | None = None) -> tuple[list[dict], list[dict]]:
    """Median latency per image (text encoding and VAE decode included) of the teacher (50 steps, CFG 4: DDIM,
    or Euler for a flow teacher) and each student at every step count and images-per-call batch size, with the
    speed-up over the teacher at the same batch size; and, per batch size, the call's parts timed alone with
    the speed-up they imply. ``compile_networks`` compiles every pipeline's denoiser and VAE decoder alike
    (each timing's warm-up call compiles its shapes). ``decoder``, an autoencoder folder, replaces every
    pipeline's VAE for decoding (teacher and students alike; the parts' decode too)."""
    from stepdistill.evaluation.decoder_swap import load_decoder, use_decoder
    from stepdistill.evaluation.generate import Generator, load_student, shared_noise, teacher_solver
    from stepdistill.evaluation.sampling_parts import predicted_speedup, sampling_parts_ms
    from stepdistill.teacher import WEIGHT_DTYPES, load_teacher
    from stepdistill.testbed import resolve_teacher_path
    from stepdistill.training.accel import compile_for_sampling

    torch_dtype = WEIGHT_DTYPES[dtype]
    path = resolve_teacher_path(teacher)
    wrapper = load_teacher(path, device=device, dtype=torch_dtype, max_sequence_length=max_sequence_length)
    noise = shared_noise(wrapper, max(batch_sizes), 0).to(device, torch_dtype)  # pipelines take latents as given
    solver = "euler" if wrapper.schedule.kind == "flow" else "ddim"  # DDIM has no flow-matching form in diffusers
    wrapper.pipe.scheduler = teacher_solver(wrapper.pipe, solver)
    call = wrapper.pipeline_call_kwargs()  # as the sweep and the trainers
    label = {"ddim": "DDIM", "euler": "Euler"}[solver]
    generators = [(f"teacher {label}, CFG 4", Generator("teacher", wrapper.pipe, 4.0, call), [50])]
    for spec in students:
        generators.append((spec.split("=")[0], load_student(spec, path, call, device, torch_dtype), steps))  # LoRA students fused, as deployed
    if decoder:
        use_decoder([generator.pipe for _, generator, _ in generators], load_decoder(decoder, device, torch_dtype))
    if compile_networks:
        for _, generator, _ in generators:
            compile_for_sampling(generator.pipe)  # the teacher's pipe is the wrapper's: the parts run compiled too
    rows, teacher_ms, parts_rows = [], {}, []
    for batch in batch_sizes:
        if students:  # no student, no speed-up to explain
            parts = sampling_parts_ms(wrapper, batch, 4.0, repeats)
            parts_rows.append({"images_per_call": batch, "parts_ms": parts,
                               "predicted_speedup": {str(k): predicted_speedup(parts, k) for k in steps}})
        for name, generator, step_counts in generators:
            for k in step_counts:
                ms = generator.latency_ms("rocket", k, noise, repeats, batch)
                teacher_ms.setdefault(batch, ms)
                rows.append({"model": name, "steps": k, "images_per_call": batch, "latency_ms": ms,
                             "speedup_vs_teacher": teacher_ms[batch] / ms})
    return rows, parts_rows


# --- reference comparison ----------------------------------------------------------------------------------
def write_shards(folder: Path, repeats: int) -> str:
    """emoji32 as one webdataset tar shard (png + txt per sample), the input format of diffusers' wds scripts.

    One shard holding the set ``repeats`` times: the reference script's own tar grouping fails on the
    end-of-shard marker that current webdataset releases emit, so the run must not reach a shard's end."""
    from PIL import Image

    from stepdistill.data.emoji32 import load_emoji32

    data = load_emoji32()
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for copy in range(repeats):
            for i, caption in enumerate(data.captions):
                key = f"{copy:02d}{i:06d}"
                for suffix, payload in (("png", _png(Image.fromarray(data.images[i]))), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, BytesIO(payload))
    return str(folder / "00000.tar")


def _png(image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


TQDM_BAR = re.compile(r"^(?P<label>.*?):?\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[")


def read_stamped(stream: BinaryIO) -> list[tuple[float, str]]:
    """Everything ``stream`` yields until it closes, as (time it arrived, text) chunks."""
    decoder, chunks = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    while data := os.read(stream.fileno(), 65536):
        chunks.append((time.monotonic(), decoder.decode(data)))
    return chunks


def stamped_lines(chunks: list[tuple[float, str]]) -> Iterator[tuple[float, str]]:
    """The log's lines, each with the time its first character arrived. tqdm redraws as carriage return plus
    bar, so a bar's text arrives at its redraw, while its end only comes with the next one."""
    carry, began = "", 0.0
    for stamp, text in chunks:
        *ended, rest = re.split(r"[\r\n]", text)
        if not carry:
            began = stamp
        if ended:
            yield began, carry + ended[0]
            yield from ((stamp, line) for line in ended[1:])
            carry, began = rest, stamp
        else:
            carry += rest
    if carry:
        yield began, carry


def tqdm_seconds_per_step(chunks: list[tuple[float, str]], warmup: int, total: int) -> float:
    """Seconds per step between step ``warmup`` and the last step of the run's own progress bar: the last bar
    to appear with ``total`` steps (loading a model prints bars of its own, from transformers 5 on), timed by
    when each step's redraw reached us rather than by tqdm's whole-second elapsed field."""
    bars: dict[str, dict[int, float]] = {}
    for stamp, line in stamped_lines(chunks):
        match = TQDM_BAR.search(line)
        if match and int(match["total"]) == total:
            bar = bars.pop(match["label"].strip(), {})  # re-inserted: the dict's last bar is the last one drawn
            bar.setdefault(int(match["n"]), stamp)
            bars[match["label"].strip()] = bar
    seen = bars[next(reversed(bars))] if bars else {}
    last = max(seen, default=0)
    if warmup not in seen or last <= warmup:
        tail = "".join(text for _, text in chunks)[-500:]
        raise RuntimeError(f"no {total}-step tqdm progress found between step {warmup} and the end; log tail: {tail}")
    return (seen[last] - seen[warmup]) / (last - warmup)


def run_timed(cmd: list[str], env: dict[str, str],
              gpu: bool = False) -> tuple[list[tuple[float, str]], float, float | None, float | None]:
    """Run ``cmd``; return its stderr as (arrival time, text) chunks, the peak RSS of the largest single process
    in its tree (wait4 folds in the reaped descendants': the main process, or with ``accelerate launch`` the
    largest training process), the peak PSS of its whole process tree (data-loader workers and every launched
    process included; None where /proc does not tell), both in MiB, and with ``gpu`` the peak GPU memory
    nvidia-smi shows for the tree (MiB; None where it shows none)."""
    from stepdistill.evaluation.process_memory import PeakTreeMemory, available

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    with PeakTreeMemory(proc.pid, gpu=gpu) as tree:
        chunks = read_stamped(proc.stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = "".join(text for _, text in chunks)
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {err[-3000:]}")
    return chunks, usage.ru_maxrss / 1024, tree.peak if available() else None, tree.gpu_peak


def compatible_reference(script: Path, work: Path) -> Path:
    """A copy of the reference script whose unconditional prompt uses the tokenizer's length instead of a
    hard-coded 77 (SD1.5's CLIP), which the testbed's 32-token text encoder cannot take. Nothing else changes."""
    text = script.read_text()
    hard_coded = 'padding="max_length", max_length=77'
    if hard_coded not in text:
        return script
    work.mkdir(parents=True, exist_ok=True)
    patched = work / script.name
    patched.write_text(text.replace(hard_coded, 'padding="max_length", max_length=tokenizer.model_max_length'))
    return patched


def launched(script: Path, processes: int, mixed_precision: str, port: int | None = None) -> list[str]:
    """The command that starts ``script``: plain ``python`` for one process, several through accelerate's
    multi-process launcher (torchrun; one torch thread per process). Without ``--multi_gpu``,
    ``accelerate launch --num_processes N`` on a machine without GPUs starts one process, not N; run it with
    :func:`launch_env` so that those processes are CPU ones joined by gloo. ``port``: the rendezvous port
    (default: one that is free now)."""
    if processes == 1:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port or free_port()), "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no", str(script)]


def free_port() -> int:
    """A local TCP port nothing listens on now, so a launch never meets another job on accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_env(cuda: bool) -> dict[str, str]:
    """The environment both scripts run in: offline, tqdm redrawing every step, and on a machine without CUDA
    ``ACCELERATE_USE_CPU``, without which a script's ``Accelerator()`` under torchrun finds no device to join
    on and trains alone in every process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "0"}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def teacher_resolution(teacher_dir: Path) -> int:
    """The image size both scripts train at: the teacher VAE's ``sample_size`` (testbed 32, SD1.5 512)."""
    config = teacher_dir / "vae" / "config.json"
    if not config.is_file():
        raise SystemExit(f"error: teacher {str(teacher_dir)!r} has no vae/config.json; give a diffusers pipeline folder")
    return int(json.loads(config.read_text()).get("sample_size", 32))


def reference_commands(script: Path, work: Path, teacher_dir: Path, batch: int, total_steps: int, extra: list[str],
                       mixed_precision: str, processes: tuple[int, int]) -> tuple[list[str], list[str]]:
    """(reference, ours): the two launch lines for the same LCM-LoRA work at the teacher's own resolution.
    Both scripts' batch size is per process, so each gets its share of the global ``batch``."""
    shared = ["--pretrained_teacher_model", str(teacher_dir), "--resolution", str(teacher_resolution(teacher_dir)),
              "--max_train_steps", str(total_steps), "--learning_rate", "3e-5", "--lr_warmup_steps", "0", "--lora_rank", "16",
              "--lora_alpha", "16", "--num_ddim_timesteps", "50", "--w_min", "3", "--w_max", "3", "--loss_type", "l2",
              "--mixed_precision", mixed_precision, "--report_to", "tensorboard", "--seed", "0", "--checkpointing_steps", "100000"]
    per_process = [["--train_batch_size", str(batch // n)] for n in processes]
    reference = [*launched(script, processes[0], mixed_precision), *shared, *per_process[0], "--output_dir", str(work / "reference"),
                 "--train_shards_path_or_url",
                 write_shards(work / "shards", repeats=2 + total_steps * batch // 1388), "--max_train_samples", "1388",
                 "--dataloader_num_workers", "1", "--validation_steps", "100000"]
    ours = [*launched(ROOT / "train_scripts" / "train_lcm.py", processes[1], mixed_precision), *shared, *per_process[1],
            "--output_dir", str(work / "ours"),
            "--validation_steps", "0", "--use_target_network", "false", "--overwrite_output_dir", *extra]
    return reference, ours


def compare_with_reference(script: Path, work: Path, teacher: str, batch: int, warmup: int, steps: int,
                           extra: list[str] | None = None, pairs: int = 1, mixed_precision: str = "no",
                           processes: tuple[int, int] = (1, 1)) -> dict:
    """Same LCM-LoRA work through diffusers' reference script and through train_lcm.py, ``pairs`` times back to
    back (reference, then ours); the medians of the pairs. ``processes`` (reference, ours) data-parallel
    processes share the global ``batch``. The reference decodes its images in one data-loader worker per
    process, its minimum (it divides by the worker count). On a CUDA machine each run's peak GPU memory is read
    from nvidia-smi, from outside the script, so both are measured the same way."""
    import torch

    from stepdistill.evaluation.speed_report import summarise_reference_pairs
    from stepdistill.testbed import resolve_teacher_path

    reference, ours = reference_commands(compatible_reference(script, work), work, Path(resolve_teacher_path(teacher)),
                                         batch, warmup + steps, extra or [], mixed_precision, processes)
    env = launch_env(torch.cuda.is_available())
    results = []
    for index in range(pairs):
        pair = {}
        for name, cmd in (("reference", reference), ("stepdistill", ours)):
            log, peak, tree_peak, gpu_peak = run_timed(cmd, env, gpu=torch.cuda.is_available())
            seconds = tqdm_seconds_per_step(log, warmup, warmup + steps)
            pair[name] = {"s_per_step": seconds, "images_per_s": batch / seconds, "peak_rss_mib": peak,
                          "peak_tree_pss_mib": tree_peak, "peak_gpu_mib": gpu_peak}
        print(f"pair {index + 1}/{pairs}: reference {pair['reference']['images_per_s']:.1f} img/s, "
              f"stepdistill {pair['stepdistill']['images_per_s']:.1f} img/s", flush=True)
        results.append(pair)
    return summarise_reference_pairs(results)


def memory_text(run: dict) -> str:
    """'1300 MiB RSS (largest process), 1420 MiB PSS (process tree)[, 9000 MiB GPU]' for the console."""
    text = f"{run['peak_rss_mib']:.0f} MiB RSS (largest process)"
    text += f", {run['peak_tree_pss_mib']:.0f} MiB PSS (process tree)" if run.get("peak_tree_pss_mib") else ""
    return text + (f", {run['peak_gpu_mib']:.0f} MiB GPU (nvidia-smi)" if run.get("peak_gpu_mib") else "")


def int_list(text: str, option: str) -> list[int]:
    """A comma list of positive integers, or a one-line exit naming the option and the bad value."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        sys.exit(f"error: {option} {text!r} must be a comma list of positive integers, e.g. 1,16")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="training,sampling", help="comma list of training, sampling, reference")
    parser.add_argument("--trainers", default="lcm,progressive,ladd")
    parser.add_argument("--teacher", default="tiny-sd")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--measure_steps", type=int, default=30)
    parser.add_argument("--students", nargs="*", default=[], help="name=folder students for the sampling part")
    parser.add_argument("--sampling_steps", default="1,2,4,8")
    parser.add_argument("--sampling_batch_sizes", default="1",
                        help="images per pipeline call for the sampling part, e.g. 1,16 (latency is per image)")
    parser.add_argument("--sampling_repeats", type=int, default=5, help="timed calls per sampling row (median)")
    parser.add_argument("--sampling_device", default="cpu", help="sampling part: cpu or cuda")
    parser.add_argument("--sampling_dtype", default="fp32", help="sampling part: weights in fp32, fp16 or bf16")
    parser.add_argument("--sampling_compile", default="false", choices=["true", "false"],
                        help="sampling part: torch.compile every pipeline's denoiser and VAE decoder (teacher and "
                        "students alike); compiling takes minutes and is not timed")
    parser.add_argument("--sampling_decoder", help="sampling part: an AutoencoderKL or AutoencoderTiny folder that every "
                        "pipeline decodes with instead of its own VAE (teacher and students alike), e.g. a TAESD")
    parser.add_argument("--max_sequence_length", type=int, default=8,
                        help="T5 tokens per prompt of SD3, PixArt and Flux teachers, as in the sweep (testbed DiT: 8)")
    parser.add_argument("--reference_script", help="diffusers' train_lcm_distill_lora_sd_wds.py (reference part)")
    parser.add_argument("--reference_pairs", type=int, default=1,
                        help="reference part: back-to-back pairs of runs (reference, then ours); medians are reported")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                        help="reference part: --mixed_precision given to both scripts")
    parser.add_argument("--reference_processes", type=int, default=1,
                        help="reference part: data-parallel processes the reference script runs as (accelerate "
                        "launch --multi_gpu when > 1, CPU processes on a machine without CUDA); they share --train_batch_size")
    parser.add_argument("--stepdistill_processes", type=int, default=1,
                        help="reference part: data-parallel processes train_lcm.py runs as (as above)")
    parser.add_argument("--output_dir", default="runs/bench_speed")
    parser.add_argument("--trainer_args", default="", help="extra options for our trainers, e.g. '--torch_compile true' "
                        "(raise --warmup_steps past the compile)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace, parts: set[str]) -> None:
    """Every bad option is a one-line exit before anything is written."""
    if not parts <= {"training", "sampling", "reference"}:
        sys.exit(f"error: --parts {args.parts!r} may only name training, sampling and reference")
    int_list(args.sampling_steps, "--sampling_steps")
    int_list(args.sampling_batch_sizes, "--sampling_batch_sizes")
    if args.sampling_device not in ("cpu", "cuda"):
        sys.exit(f"error: --sampling_device {args.sampling_device!r} is not known; allowed: cpu, cuda")
    if args.sampling_device == "cuda" and "sampling" in parts:
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --sampling_device 'cuda' needs a CUDA GPU; torch.cuda.is_available() is False here")
    if args.sampling_dtype not in ("fp32", "fp16", "bf16"):
        sys.exit(f"error: --sampling_dtype {args.sampling_dtype!r} is not known; allowed: fp32, fp16, bf16")
    if args.sampling_decoder and "sampling" in parts:
        from stepdistill.errors import StepdistillError
        from stepdistill.evaluation.decoder_swap import decoder_class

        try:
            decoder_class(args.sampling_decoder)
        except StepdistillError as err:
            sys.exit(f"error: --sampling_decoder: {err}")
    if args.reference_pairs < 1:
        sys.exit(f"error: --reference_pairs {str(args.reference_pairs)!r} must be a positive integer")
    for option in ("reference_processes", "stepdistill_processes"):
        n = getattr(args, option)
        if n < 1 or args.train_batch_size % n:
            sys.exit(f"error: --{option} {n} must be a positive divisor of --train_batch_size {args.train_batch_size}")
    if "reference" in parts and not (args.reference_script and Path(args.reference_script).is_file()):
        sys.exit(f"error: --reference_script {args.reference_script!r} is not a file; give diffusers' "
                 "examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py")


def training_part(args: argparse.Namespace, out: Path) -> list[dict]:
    """Each trainer measured in a child process of its own, so one trainer's memory does not count for another."""
    from stepdistill.evaluation.speed_report import rate_text

    rows = []
    for trainer in args.trainers.split(","):
        cmd = [sys.executable, __file__, "--child", trainer, "--teacher", args.teacher, "--output_dir", str(out),
               "--train_batch_size", str(args.train_batch_size), "--warmup_steps", str(args.warmup_steps),
               "--measure_steps", str(args.measure_steps), "--trainer_args", args.trainer_args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"error: the {trainer} measurement failed: {done.stderr[-2000:]}")
        row = json.loads(line[len("RESULT "):])
        rows.append(row)
        split = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["split_s_per_step"].items()))
        print(f"{trainer:12s} {rate_text(row['images_per_s']):>7s} img/s  {row['s_per_step']:.3f} s/step ({split})  "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB"
              + (f", peak GPU memory {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") is not None else ""),
              flush=True)
    return rows


def sampling_part(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Latency rows of the teacher and the students, and the parts of one call at every batch size."""
    from stepdistill.errors import StepdistillError

    try:
        rows, parts = measure_sampling(args.teacher, args.students, int_list(args.sampling_steps, "--sampling_steps"),
                                       int_list(args.sampling_batch_sizes, "--sampling_batch_sizes"), args.sampling_repeats,
                                       args.max_sequence_length, args.sampling_device, args.sampling_dtype,
                                       args.sampling_compile == "true", args.sampling_decoder)
    except StepdistillError as err:  # a student or decoder that does not fit the teacher
        sys.exit(f"error: {err}")
    for row in rows:
        print(f"{row['model']:24s} {row['steps']:3d} steps  {row['images_per_call']:3d} per call  "
              f"{row['latency_ms']:8.1f} ms/image  {row['speedup_vs_teacher']:5.1f}x", flush=True)
    for row in parts:
        pieces = ", ".join(f"{k} {v:.1f}" for k, v in row["parts_ms"].items())
        implied = ", ".join(f"{k} steps {v['with_fixed_costs']:.1f}x (network only {v['network_only']:.1f}x)"
                            for k, v in row["predicted_speedup"].items())
        print(f"parts of a call of {row['images_per_call']} (ms): {pieces}; implied speed-up: {implied}", flush=True)
    return rows, parts


def reference_part(args: argparse.Namespace, out: Path) -> dict:
    """The pairs against diffusers' reference script, with the launch they used."""
    result = compare_with_reference(Path(args.reference_script), out / "reference_run", args.teacher,
                                    args.train_batch_size, args.warmup_steps, args.measure_steps,
                                    shlex.split(args.trainer_args), args.reference_pairs, args.mixed_precision,
                                    (args.reference_processes, args.stepdistill_processes))
    result["mixed_precision"] = args.mixed_precision
    result["processes"] = {"reference": args.reference_processes, "stepdistill": args.stepdistill_processes}
    ref, ours = result["reference"], result["stepdistill"]
    label = f" (median of {args.reference_pairs} pairs)" if args.reference_pairs > 1 else ""
    print(f"LCM-LoRA, batch {args.train_batch_size}{label}: reference {ref['images_per_s']:.1f} img/s, {memory_text(ref)}; "
          f"stepdistill {ours['images_per_s']:.1f} img/s, {memory_text(ours)}; speed-up {result['speedup']:.2f}x", flush=True)
    return result


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.output_dir)
    if args.child:
        result = measure_trainer(args.child, out / f"train_{args.child}", args.train_batch_size, args.warmup_steps,
                                 args.measure_steps, args.teacher, shlex.split(args.trainer_args))
        print("RESULT " + json.dumps(result))
        return
    parts = set(args.parts.split(","))
    check_args(args, parts)
    out.mkdir(parents=True, exist_ok=True)
    from stepdistill.evaluation.speed_report import speed_markdown, write_speed_plot

    report: dict = {}
    if "training" in parts:
        report["training"] = training_part(args, out)
    if "sampling" in parts:
        report["sampling"], report["sampling_parts"] = sampling_part(args)
        report["sampling_options"] = {"device": args.sampling_device, "dtype": args.sampling_dtype,
                                      "compile": args.sampling_compile == "true"}
        if args.sampling_decoder:
            report["sampling_options"]["decoder"] = args.sampling_decoder
    if "reference" in parts:
        report["reference"] = reference_part(args, out)
    (out / "bench_speed.json").write_text(json.dumps(report, indent=2))
    (out / "bench_speed.md").write_text(speed_markdown(report))
    write_speed_plot(report, out / "bench_speed.png")
    print(f"report: {out / 'bench_speed.md'}, {out / 'bench_speed.png'}", flush=True)


if __name__ == "__main__":
    main()
