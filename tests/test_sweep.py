"""The step sweep end to end on a small random teacher: rows, report files, and self-consistency."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stepdistill.errors import ConfigError
from stepdistill.evaluation.emoji_evaluator import EmojiClassifier
from stepdistill.evaluation.report import markdown_table
from stepdistill.evaluation.sweep import SweepConfig, run_sweep


@pytest.fixture(scope="module")
def random_setup(tmp_path_factory, sd_pipe):
    root = tmp_path_factory.mktemp("sweep")
    sd_pipe.save_pretrained(root / "teacher")
    sd_pipe.save_pretrained(root / "student")
    (root / "student" / "stepdistill_student.json").write_text(json.dumps({"scheduler": "LCMScheduler", "guidance_scale": 1.0}))
    torch.manual_seed(0)
    save_file(EmojiClassifier(1388).state_dict(), str(root / "evaluator.safetensors"))
    return root


def test_sweep_writes_report_and_reference_row_matches_itself(random_setup):
    root = random_setup
    cfg = SweepConfig(teacher=str(root / "teacher"), students=[f"fast={root / 'student'}"], teacher_solvers=["ddim", "euler"],
                      teacher_steps=[1, 3], student_steps=[2], reference_steps=3, num_prompts=12, seeds=[0, 1],
                      batch_size=12, evaluator=str(root / "evaluator.safetensors"), latency_repeats=1,
                      output_dir=str(root / "out"))
    rows = run_sweep(cfg)
    assert [(r["model"], r["solver"], r["steps"]) for r in rows] == [
        ("teacher", "ddim", 1), ("teacher", "ddim", 3), ("teacher", "euler", 1), ("teacher", "euler", 3), ("fast", "student", 2)]
    reference_row = rows[1]
    assert reference_row["feature_dist_vs_teacher"] < 1e-4 and reference_row["psnr_vs_teacher"] > 60
    assert rows[0]["psnr_vs_teacher"] < 60  # a different step count gives different images
    assert rows[0]["nfe"] == 2 and rows[4]["nfe"] == 2  # CFG doubles teacher evaluations
    assert all(r["fid"] >= 0 and r["latency_ms"] > 0 and 0 <= r["top1"] <= r["top5"] <= 1 for r in rows)
    assert all("fid_std" in r for r in rows)
    saved = json.loads((root / "out" / "sweep.json").read_text())
    assert saved["rows"] == rows
    table = (root / "out" / "sweep.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| fast | student | 2 |" in table
    plot = Image.open(root / "out" / "fid_vs_steps.png")
    assert plot.size[0] > 400 and len(np.unique(np.asarray(plot.convert("L")))) > 10  # drawn, not blank
    assert (root / "out" / "grids" / "teacher-ddim-03steps.png").is_file()


def test_markdown_table_formats_spread():
    table = markdown_table([{"model": "m", "solver": "s", "steps": 4, "nfe": 4, "fid": 1.234, "fid_std": 0.1, "top1": 0.5}])
    assert "| m | s | 4 | 4 | 1.23 ± 0.10 | - | 50.00 |" in table


def test_bad_sweep_options():
    with pytest.raises(ConfigError, match="teacher_steps contains 0"):
        SweepConfig(teacher_steps=[0]).validate()
    with pytest.raises(ConfigError, match="seeds must name"):
        SweepConfig(seeds=[]).validate()


class _FixedCostPipe:
    """A stand-in pipeline whose call costs the same whatever its batch: per-call overhead only."""

    def __init__(self):
        self.batches = []

    def __call__(self, prompts, latents, **_):
        from types import SimpleNamespace

        self.batches.append((len(prompts), latents.shape[0]))
        time.sleep(0.05)
        return SimpleNamespace(images=torch.zeros(len(prompts), 3, 4, 4))


def test_latency_is_per_image_of_a_batched_call():
    from stepdistill.evaluation.generate import Generator

    pipe = _FixedCostPipe()
    generator = Generator("fake", pipe, 1.0, {})
    noise = torch.zeros(8, 4, 2, 2)
    single = generator.latency_ms("rocket", 4, noise, repeats=2, batch_size=1)
    batched = generator.latency_ms("rocket", 4, noise, repeats=2, batch_size=8)
    assert pipe.batches[-1] == (8, 8) and pipe.batches[0] == (1, 1)
    assert single >= 45 and batched < single / 4  # one 50 ms call shared by 8 images
    with pytest.raises(ConfigError, match="batch_size=16 needs 16 initial latents"):
        generator.latency_ms("rocket", 4, noise, batch_size=16)


@pytest.mark.parametrize("option, value, message", [
    ("--sampling_batch_sizes", "0,16", "must be a comma list of positive integers, e.g. 1,16"),
    ("--sampling_steps", "4,x", "must be a comma list of positive integers, e.g. 1,16"),
    ("--parts", "sampling,speed", "may only name training, sampling and reference"),
    ("--reference_pairs", "0", "must be a positive integer"),
    ("--sampling_device", "tpu", "is not known; allowed: cpu, cuda"),
    ("--sampling_dtype", "int8", "is not known; allowed: fp32, fp16, bf16"),
])
def test_benchmark_refuses_bad_parts_steps_or_batch_lists(tmp_path, option, value, message):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py"
    out = tmp_path / "bench"
    argv = [option, value] if option == "--parts" else ["--parts", "sampling", option, value]
    done = subprocess.run([sys.executable, str(script), *argv, "--output_dir", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and not out.exists()
    assert done.stderr.strip().splitlines()[-1] == f"error: {option} {value!r} {message}"


def test_speed_report_tables_and_plot(tmp_path):
    from stepdistill.evaluation.speed_report import speed_markdown, write_speed_plot

    report = {
        "training": [{"trainer": "lcm", "batch": 32, "images_per_s": 91.4, "s_per_step": 0.35,
                      "split_s_per_step": {"student": 0.3, "data": 0.01}, "peak_rss_mib": 1376.3},
                     {"trainer": "lcm", "batch": 8, "images_per_s": 0.0284, "s_per_step": 35.2,
                      "split_s_per_step": {"student": 0.3}, "peak_rss_mib": 5120.0, "peak_gpu_mib": 14336.4}],
        "sampling": [{"model": "teacher DDIM, CFG 4", "steps": 50, "images_per_call": 1, "latency_ms": 640.0, "speedup_vs_teacher": 1.0},
                     {"model": "lcm-lora", "steps": 4, "images_per_call": 1, "latency_ms": 44.3, "speedup_vs_teacher": 14.45}],
        "sampling_parts": [{"images_per_call": 1, "parts_ms": {"encode": 1.0, "encode_cfg": 2.0, "pass": 8.0, "cfg_pass": 11.0, "decode": 5.0},
                            "predicted_speedup": {"4": {"with_fixed_costs": 14.6, "network_only": 17.19}}}],
        "reference": {"reference": {"images_per_s": 72.7, "peak_rss_mib": 1302.4, "s_per_step": 0.44},
                      "stepdistill": {"images_per_s": 91.4, "peak_rss_mib": 1376.3, "s_per_step": 0.35}, "speedup": 1.257},
    }
    text = speed_markdown(report)
    assert "| lcm | 32 | 91.4 | 0.350 | data 0.010, student 0.300 | 1376 | n/a |" in text  # a CPU run
    assert "| lcm | 8 | 0.028 | 35.200 | student 0.300 | 5120 | 14336 |" in text
    assert "| lcm-lora | 4 | 1 | 44.3 | 14.4x |" in text and "speed-up: 1.26x" in text
    assert "| 1 | 1.0 | 2.0 | 8.0 | 11.0 | 5.0 | 14.6x (17.2x) |" in text and "implied 4-step speed-up" in text
    write_speed_plot(report, tmp_path / "speed.png")
    plot = Image.open(tmp_path / "speed.png")
    assert plot.size[0] > 3 * plot.size[1] / 2 and len(np.unique(np.asarray(plot.convert("L")))) > 10  # three panels, drawn
    only_sampling = {"sampling": report["sampling"]}
    assert "images/s" not in speed_markdown(only_sampling) and "(eager)" in speed_markdown(only_sampling)
    compiled = {**only_sampling, "sampling_options": {"device": "cpu", "dtype": "fp32", "compile": True}}
    assert "Sampling (device cpu, dtype fp32; denoisers and VAE decoders compiled" in speed_markdown(compiled)
    write_speed_plot(only_sampling, tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").size[0] < plot.size[0]
    with pytest.raises(ValueError, match="no measured part"):
        write_speed_plot({}, tmp_path / "none.png")


def test_reference_pairs_report_medians_of_in_pair_ratios():
    """The speed-up is the median of each pair's own ratio: a slow reference run in one pair (the machine
    drifting) does not decide it, and the ratio of the two medians is not what is reported."""
    from stepdistill.evaluation.speed_report import speed_markdown, summarise_reference_pairs

    def pair(ref: float, ours: float) -> dict:
        return {"reference": {"images_per_s": ref, "s_per_step": 32 / ref, "peak_rss_mib": 1300.0, "peak_tree_pss_mib": 1450.0},
                "stepdistill": {"images_per_s": ours, "s_per_step": 32 / ours, "peak_rss_mib": 1340.0, "peak_tree_pss_mib": 1345.0}}

    summary = summarise_reference_pairs([pair(80.0, 96.0), pair(60.0, 99.0), pair(76.0, 95.0)])
    assert summary["speedup"] == pytest.approx(95.0 / 76.0)  # ratios 1.20, 1.65, 1.25: median 1.25
    assert summary["reference"]["images_per_s"] == 76.0 and summary["stepdistill"]["images_per_s"] == 96.0
    assert summary["stepdistill"]["peak_rss_mib"] == 1340.0 and len(summary["pairs"]) == 3
    text = speed_markdown({"reference": summary})
    assert summary["reference"]["peak_tree_pss_mib"] == 1450.0
    assert "median of 3 pairs" in text and "| 2 | 60.0, 1300, 1450 | 99.0, 1340, 1345 | 1.65x |" in text
    assert "| reference | 76.0 | 1300 | 1450 |" in text and "speed-up: 1.25x" in text
    with pytest.raises(ValueError, match="no reference pair"):
        summarise_reference_pairs([])
    summary["processes"] = {"reference": 2, "stepdistill": 2}
    assert "median of 3 pairs; reference as 2 processes; stepdistill as 2 processes" in speed_markdown({"reference": summary})


def test_benchmark_launches_several_processes_through_accelerate(tmp_path):
    """One process runs the script directly; several go through ``accelerate launch`` and really are several:
    a plain ``Accelerator()`` script (as diffusers' reference script is) sees two ranks of a two-process gloo
    group, not two lone processes. A process count that does not divide the batch is refused before anything runs."""
    import subprocess
    import sys
    from importlib.util import module_from_spec, spec_from_file_location

    script = Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py"
    spec = spec_from_file_location("benchmark_speed", script)
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.launched(Path("t.py"), 1, "no") == [sys.executable, "t.py"]
    probe = tmp_path / "ranks.py"
    # accelerate starts its processes unbuffered (python -u), so each writes its whole line at once (one write
    # of a short line to a pipe is atomic) rather than print's pieces, which the two processes would interleave
    probe.write_text("import os\nfrom accelerate import Accelerator\nimport torch.distributed as dist\na = Accelerator()\n"
                     "backend = dist.get_backend() if dist.is_initialized() else None\n"
                     "os.write(1, f'rank {a.process_index} {a.num_processes} {backend}\\n'.encode())\n")
    # a fixed port outside the ephemeral range, as the other two-process tests use
    ran = subprocess.run(bench.launched(probe, 2, "no", port=29553), env=bench.launch_env(cuda=False),
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, (ran.stdout[-2000:], ran.stderr[-3000:])
    ranks = sorted(line.split()[1:] for line in ran.stdout.splitlines() if line.startswith("rank "))
    assert ranks == [["0", "2", "gloo"], ["1", "2", "gloo"]], (ran.stdout[-2000:], ran.stderr[-3000:])
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(script), "--parts", "sampling", "--train_batch_size", "32",
                           "--stepdistill_processes", "3", "--output_dir", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and not out.exists()
    assert done.stderr.strip().splitlines()[-1] == \
        "error: --stepdistill_processes 3 must be a positive divisor of --train_batch_size 32"


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_tree_memory_sees_a_worker_process_that_max_rss_misses():
    """A script holding 200 MiB whose worker process holds 300 MiB at the same time: a max RSS sees at most one
    of them (about 310 MiB), the peak PSS of the process tree sees both."""
    import subprocess
    import sys

    from stepdistill.evaluation.process_memory import PeakTreeMemory

    touch = "{0} = bytearray({1} * 2**20); {0}[::4096] = b'x' * len({0}[::4096])"
    worker = f"import time; {touch.format('b', 300)}; time.sleep(2)"
    main = f"import subprocess, sys; {touch.format('a', 200)}; subprocess.run([sys.executable, '-c', {worker!r}], check=True)"
    proc = subprocess.Popen([sys.executable, "-c", main])
    with PeakTreeMemory(proc.pid, interval=0.05) as tree:
        assert proc.wait() == 0
    assert tree.peak > 480


def test_tree_gpu_memory_is_read_from_nvidia_smi_for_the_tree_only(tmp_path, monkeypatch):
    """On a GPU machine the reference comparison reads each script's GPU memory from outside it: the sum over
    the launched process and its children of what nvidia-smi lists, not other processes' memory; without
    nvidia-smi there is no figure rather than a zero."""
    import subprocess
    import sys

    from stepdistill.evaluation.process_memory import PeakTreeMemory, tree_gpu_mib

    listing = tmp_path / "apps.csv"
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat {listing}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(1.5)'])"
    proc = subprocess.Popen([sys.executable, "-c", child])
    time.sleep(0.5)
    kids = descendant_pids(proc.pid)
    listing.write_text(f"{proc.pid}, 1500\n{kids[0]}, 2500\n999999999, 70000\n[N/A], [N/A]\n")
    with PeakTreeMemory(proc.pid, interval=0.05, gpu=True) as tree:
        assert proc.wait() == 0
    assert tree.gpu_peak == 4000.0  # the script and its child, not the stranger
    assert tree_gpu_mib(999999998) is None  # a process nvidia-smi does not list
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert tree_gpu_mib(os.getpid()) is None


def descendant_pids(pid: int) -> list[int]:
    from stepdistill.evaluation.process_memory import descendants

    for _ in range(50):
        if found := descendants(pid):
            return found
        time.sleep(0.05)
    raise AssertionError(f"process {pid} started no child")


def test_reference_comparison_trains_both_scripts_at_the_teachers_resolution(tmp_path):
    """The same launch options for both scripts, at the teacher VAE's own image size: 32 px for the testbed,
    512 px for an SD1.5-size teacher on the GPU (it used to be 32 for every teacher)."""
    from importlib.util import module_from_spec, spec_from_file_location

    from stepdistill.testbed import shipped_teacher_path

    spec = spec_from_file_location("benchmark_speed", Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    big = tmp_path / "sd15" / "vae"
    big.mkdir(parents=True)
    (big / "config.json").write_text('{"sample_size": 512}')
    reference, ours = bench.reference_commands(Path("ref.py"), tmp_path / "work", big.parent, 8, 13, ["--num_threads", "1"],
                                               "fp16", (1, 2))

    def option(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    for cmd in (reference, ours):
        assert option(cmd, "--resolution") == "512" and option(cmd, "--pretrained_teacher_model") == str(big.parent)
        assert option(cmd, "--mixed_precision") == "fp16" and option(cmd, "--max_train_steps") == "13"
    assert option(reference, "--train_batch_size") == "8" and option(ours, "--train_batch_size") == "4"  # 2 processes
    assert ours[-2:] == ["--num_threads", "1"] and Path(option(reference, "--train_shards_path_or_url")).is_file()
    reference, _ = bench.reference_commands(Path("ref.py"), tmp_path / "work", shipped_teacher_path("tiny-sd"), 32, 5, [],
                                            "no", (1, 1))
    assert option(reference, "--resolution") == "32"
    with pytest.raises(SystemExit, match="has no vae/config.json"):
        bench.teacher_resolution(tmp_path)


def test_reference_timing_reads_the_runs_own_progress_bar_by_arrival_time(tmp_path):
    """Both scripts are timed from their tqdm bars. Loading a model draws bars too (transformers 5), whose
    step numbers once overwrote the run's own and gave 0 s per step; and tqdm's elapsed field has whole
    seconds. The run's bar is the last with the run's step count, timed by when each redraw arrives."""
    import sys
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("benchmark_speed", Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    script = tmp_path / "train.py"
    script.write_text(
        "import time\nfrom tqdm import tqdm\n"
        "for _ in tqdm(range(36), desc='Loading weights', mininterval=0): pass\n"
        "for _ in tqdm(range(8), desc='Loading shards', mininterval=0): pass\n"
        "for step in tqdm(range(8), desc='Steps', mininterval=0):\n"
        "    time.sleep(0.05 if step < 3 else 0.25)\n")
    chunks, rss, _, gpu = bench.run_timed([sys.executable, str(script)], dict(__import__("os").environ))
    seconds = bench.tqdm_seconds_per_step(chunks, warmup=3, total=8)
    # steps 4-8 took 0.25 s each (a busy machine delays single redraws, hence the margin); the two bugs this
    # guards against read 0 s and whole seconds; no GPU was asked for
    assert 0.15 < seconds < 0.45 and rss > 0 and gpu is None
    with pytest.raises(RuntimeError, match="no 9-step tqdm progress"):
        bench.tqdm_seconds_per_step(chunks, warmup=3, total=9)
    # a redraw split across two reads counts from when it began
    split = [(0.5, "\rSteps:  0%|  | 0/8 [00:00<?]"), (1.0, "\rSteps:  50%|#  | 4/"), (2.0, "8 [00:01<00:01]"),
             (3.0, "\rSteps: 100%|##| 8/8 [00:02<00:00]\n")]
    assert bench.tqdm_seconds_per_step(split, warmup=4, total=8) == pytest.approx(0.5)


def test_reference_report_shows_gpu_memory_when_measured():
    from stepdistill.evaluation.speed_report import speed_markdown, summarise_reference_pairs

    run = {"images_per_s": 40.0, "s_per_step": 0.2, "peak_rss_mib": 3000.0, "peak_tree_pss_mib": 3100.0}
    summary = summarise_reference_pairs([{"reference": {**run, "peak_gpu_mib": 21000.0},
                                          "stepdistill": {**run, "images_per_s": 60.0, "peak_gpu_mib": 15000.0}}])
    assert summary["stepdistill"]["peak_gpu_mib"] == 15000.0
    text = speed_markdown({"reference": summary})
    assert "peak GPU memory, nvidia-smi (MiB)" in text and "| stepdistill | 60.0 | 3000 | 3100 | 15000 |" in text


def test_sampling_parts_time_the_right_calls(sd_pipe, monkeypatch):
    """Each part times its own call: a denoiser made 30 ms slower per image and a decoder 80 ms slower per
    call show up in pass (x batch), CFG pass (x 2 batch) and decode, and not in the prompt encoding."""
    import copy

    from stepdistill.evaluation.sampling_parts import sampling_parts_ms
    from stepdistill.teacher import TeacherWrapper

    teacher = TeacherWrapper(copy.copy(sd_pipe))
    unet_forward, decode = teacher.model.forward, teacher.pipe.vae.decode

    def slow_unet(x, *args, **kwargs):
        time.sleep(0.030 * x.shape[0])
        return unet_forward(x, *args, **kwargs)

    def slow_decode(*args, **kwargs):
        time.sleep(0.080)
        return decode(*args, **kwargs)

    monkeypatch.setattr(teacher.model, "forward", slow_unet)
    monkeypatch.setattr(teacher.pipe.vae, "decode", slow_decode)
    parts = sampling_parts_ms(teacher, batch_size=2, repeats=2)
    assert set(parts) == {"encode", "encode_cfg", "pass", "cfg_pass", "decode"}
    assert parts["pass"] >= 60 and parts["cfg_pass"] >= parts["pass"] + 40 and parts["decode"] >= 80
    assert parts["encode"] < 60 and parts["encode_cfg"] < 60  # no denoiser or decoder call inside


def test_predicted_speedup_from_parts():
    from stepdistill.evaluation.sampling_parts import predicted_speedup

    parts = {"encode": 1.0, "encode_cfg": 2.0, "pass": 10.0, "cfg_pass": 20.0, "decode": 5.0}
    got = predicted_speedup(parts, student_steps=4)
    assert got["network_only"] == pytest.approx(25.0)  # 50 x 2 passes against 4
    assert got["with_fixed_costs"] == pytest.approx((2 + 50 * 20 + 5) / (1 + 4 * 10 + 5))
    cheap_cfg = predicted_speedup({**parts, "cfg_pass": 12.0}, student_steps=4)
    assert cheap_cfg["network_only"] == pytest.approx(15.0)  # a CFG pass at 1.2 passes caps it at 15x


def test_sampling_benchmark_times_a_flow_teacher_with_euler():
    """DDIM has no flow-matching form in diffusers, so a DiT teacher's 50-step row is Euler (it used to be refused)."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("benchmark_speed", Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, parts = bench.measure_sampling("tiny-sd3", [], [4], [1], repeats=1)
    assert [(r["model"], r["steps"], r["images_per_call"]) for r in rows] == [("teacher Euler, CFG 4", 50, 1)]
    assert rows[0]["latency_ms"] > 0 and rows[0]["speedup_vs_teacher"] == 1.0 and parts == []
    rows, _ = bench.measure_sampling("tiny-sd", [], [4], [1], repeats=1)
    assert rows[0]["model"] == "teacher DDIM, CFG 4"


def test_sampling_benchmark_runs_the_pipelines_in_the_asked_dtype(monkeypatch):
    """On a GPU the rows are timed in fp16 or bf16; the initial latents must follow the weights' dtype."""
    from importlib.util import module_from_spec, spec_from_file_location

    from stepdistill.evaluation import generate
    from stepdistill.testbed import shipped_teacher_path

    spec = spec_from_file_location("benchmark_speed", Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen, original = [], generate.Generator.images

    def recording(self, prompts, steps, noise, batch_size):
        seen.append((self.name, self.pipe.unet.dtype, noise.dtype))
        return original(self, prompts, steps, noise, batch_size)

    monkeypatch.setattr(generate.Generator, "images", recording)
    rows, parts = bench.measure_sampling("tiny-sd", [f"same={shipped_teacher_path('tiny-sd')}"], [2], [1], repeats=1,
                                         dtype="bf16")
    assert {name for name, _, _ in seen} == {"teacher", "same"}
    assert all(weights == noise == torch.bfloat16 for _, weights, noise in seen)
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher DDIM, CFG 4", 50), ("same", 2)]
    assert rows[1]["speedup_vs_teacher"] > 1 and parts[0]["parts_ms"]["decode"] > 0
