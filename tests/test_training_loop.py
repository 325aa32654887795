"""The shared loop: resume reproduces an uninterrupted run, checkpoints are atomic, outputs are not clobbered."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel

from stepdistill.config import load_config, parse_cli
from stepdistill.errors import ConfigError
from stepdistill.training.checkpoint import list_checkpoints
from stepdistill.training.loop import LoopConfig, NonFiniteLossError, final_loss_text, run_training
from stepdistill.training.step_random import StepRandom, batch_indices


class Interrupt(Exception):
    pass


class ToyMethod:
    """Denoise 2-D points with a tiny MLP: enough to exercise data order, noise, EMA and export."""

    name = "toy"
    export_name = "model"

    def __init__(self, crash_at: int | None = None, nan_from: int | None = None):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
        self.data = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
        self.ema = EMAModel(self.net.parameters(), decay=0.9)
        self.calls, self.crash_at, self.nan_from = 0, crash_at, nan_from

    def trainable_module(self):
        return self.net

    def num_items(self):
        return len(self.data)

    def make_batch(self, indices, device):
        return {"x": self.data[indices].to(device)}

    def compute_loss(self, model, batch, rand: StepRandom):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise Interrupt()
        t = rand.rand()
        noisy = batch["x"] + t[:, None] * rand.randn(2)
        loss = (model(torch.cat([noisy, t[:, None]], 1)) - batch["x"]).pow(2).mean()
        if self.nan_from is not None and self.calls >= self.nan_from:
            loss = loss * float("nan")
        return loss, {}

    def after_optimizer_step(self, model):
        self.ema.step(model.parameters())

    def checkpoint_objects(self):
        return [self.ema]

    def validate(self, model, step, out_dir, accelerator):
        pass

    def export(self, model, out_dir: Path):
        out_dir.mkdir(parents=True)
        self.ema.copy_to(model.parameters())
        torch.save(model.state_dict(), out_dir / "weights.pt")


def cfg(tmp_path, **kw) -> LoopConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=8, train_batch_size=8, learning_rate=1e-2,
                lr_scheduler="cosine", lr_warmup_steps=2, checkpointing_steps=3, report_to="none", validation_steps=0)
    base.update(kw)
    return LoopConfig(**base)


def exported(tmp_path) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "run" / "model" / "weights.pt", weights_only=True)


def test_loss_falls(tmp_path):
    logs = run_training(ToyMethod(), cfg(tmp_path, max_train_steps=60, checkpointing_steps=100))
    first = ToyMethod()
    with torch.no_grad():
        x = first.data
        before = (first.net(torch.cat([x, torch.zeros(40, 1)], 1)) - x).pow(2).mean()
    assert logs["loss"] < before.item()


def test_resume_after_interruption_reproduces_uninterrupted_run(tmp_path):
    run_training(ToyMethod(), cfg(tmp_path / "a"))
    straight = exported(tmp_path / "a")
    with pytest.raises(Interrupt):
        run_training(ToyMethod(crash_at=5), cfg(tmp_path / "b"))  # dies after the step-3 checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-3"]
    assert not (tmp_path / "b" / "run" / "model").exists()
    run_training(ToyMethod(), cfg(tmp_path / "b", resume_from_checkpoint="latest"))
    resumed = exported(tmp_path / "b")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_at_the_last_step_re_exports_and_says_no_step_ran(tmp_path):
    import shutil

    logs = run_training(ToyMethod(), cfg(tmp_path))
    assert final_loss_text(logs) == f"final loss {logs['loss']:.5f}"
    straight = exported(tmp_path)
    shutil.rmtree(tmp_path / "run" / "model")
    again = run_training(ToyMethod(), cfg(tmp_path, resume_from_checkpoint="latest"))
    assert "loss" not in again and final_loss_text(again).startswith("no training step ran")
    resumed = exported(tmp_path)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_checkpoint_limit_and_no_temporary_leftovers(tmp_path):
    run_training(ToyMethod(), cfg(tmp_path, max_train_steps=10, checkpointing_steps=2, checkpoints_total_limit=2))
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-8", "checkpoint-10"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]


def test_a_kill_while_pruning_leaves_no_checkpoint_without_its_marker(tmp_path, monkeypatch):
    """Pruning an old checkpoint deletes files one by one; a kill midway (simulated: the deletion stops after
    the completion marker is gone) must not leave a half-deleted folder under a checkpoint-<step> name, and
    the next run clears the leftover and resumes from the newest complete checkpoint."""
    import shutil

    from stepdistill.training import checkpoint

    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        marker = Path(path) / checkpoint.META_FILE
        if marker.exists():
            marker.unlink()
            raise Interrupt("killed while deleting")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_midway)
    with pytest.raises(Interrupt):
        run_training(ToyMethod(), cfg(tmp_path, max_train_steps=10, checkpointing_steps=2, checkpoints_total_limit=2))
    run_dir = tmp_path / "run"
    named = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert named == ["checkpoint-4", "checkpoint-6"]  # checkpoint-2 was being pruned when the run died
    assert all((run_dir / name / checkpoint.META_FILE).is_file() for name in named)
    assert (run_dir / ".tmp-removing-checkpoint-2").is_dir()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    run_training(ToyMethod(), cfg(tmp_path, max_train_steps=10, checkpointing_steps=2, checkpoints_total_limit=2,
                                  resume_from_checkpoint="latest"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-8", "checkpoint-10"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]


def test_replacing_an_export_never_leaves_half_a_folder_under_its_name(tmp_path, monkeypatch):
    """The old export is renamed aside before the new one takes its name; a kill while deleting the old one
    leaves the new export whole, and the next export clears the leftover."""
    import shutil

    from stepdistill.methods import export

    final = tmp_path / "lora"

    def writer(text):
        def write(folder):
            folder.mkdir()
            (folder / "weights").write_text(text)
        return write

    export.replace_folder(final, writer("first"))
    real_rmtree = shutil.rmtree

    def dies_on_the_old_copy(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-removing-"):
            (Path(path) / "weights").unlink()
            raise Interrupt("killed while deleting")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(export.shutil, "rmtree", dies_on_the_old_copy)
    with pytest.raises(Interrupt):
        export.replace_folder(final, writer("second"))
    assert (final / "weights").read_text() == "second"
    monkeypatch.setattr(export.shutil, "rmtree", real_rmtree)
    export.replace_folder(final, writer("third"))
    assert (final / "weights").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_existing_results_are_not_clobbered(tmp_path):
    run_training(ToyMethod(), cfg(tmp_path))
    before = exported(tmp_path)
    with pytest.raises(ConfigError, match="already holds results"):
        run_training(ToyMethod(), cfg(tmp_path, learning_rate=0.5))
    after = exported(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_training(ToyMethod(), cfg(tmp_path, output_dir=str(tmp_path / "file")))


def test_nonfinite_losses_stop_training_without_export(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        run_training(ToyMethod(nan_from=4), cfg(tmp_path, max_nonfinite_steps=3))
    assert not (tmp_path / "run" / "model").exists()


def test_resume_rejects_checkpoint_of_another_trainer(tmp_path):
    run_training(ToyMethod(), cfg(tmp_path))
    other = ToyMethod()
    other.name = "other"
    with pytest.raises(ConfigError, match="written by trainer 'toy', not 'other'"):
        run_training(other, cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8")))


def test_step_random_slices_global_batch():
    full = StepRandom(3, 5, 0, 1, 8, torch.device("cpu")).randn(2)
    halves = [StepRandom(3, 5, r, 2, 4, torch.device("cpu")).randn(2) for r in range(2)]
    assert torch.equal(torch.cat(halves), full)
    idx = batch_indices(40, 8, 7, 0, 0, 8)
    assert idx[:4] == batch_indices(40, 8, 7, 0, 0, 4) and idx[4:] == batch_indices(40, 8, 7, 0, 1, 4)
    epoch = sorted(i for s in range(5) for i in batch_indices(40, 8, s, 0, 0, 8))
    assert epoch == list(range(40))  # one epoch visits every item once


def test_host_draws_match_the_device_draws_and_stay_on_the_cpu():
    """A method that branches on a draw (LADD's per-row sampler states) reads it without a device sync; the
    values must be the very ones the device draw gives, so runs are unchanged."""
    on_meta = StepRandom(3, 5, 1, 2, 4, torch.device("meta")).rand(on_host=True)
    on_cpu = StepRandom(3, 5, 1, 2, 4, torch.device("cpu")).rand()
    assert on_meta.device.type == "cpu" and torch.equal(on_meta, on_cpu)
    assert StepRandom(3, 5, 1, 2, 4, torch.device("meta")).rand().device.type == "meta"


def test_config_parsing_and_errors(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("max_train_steps: 10\nlearning_rate: 1.0e-3\n")
    config = parse_cli(LoopConfig, ["--config", str(yaml_file), "--train_batch_size", "4", "--overwrite_output_dir",
                                    "--checkpoints_total_limit=none"])
    assert (config.max_train_steps, config.learning_rate, config.train_batch_size) == (10, 1e-3, 4)
    assert config.overwrite_output_dir is True and config.checkpoints_total_limit is None
    with pytest.raises(ConfigError, match="unknown option 'max_steps'"):
        load_config(LoopConfig, overrides={"max_steps": 3})
    with pytest.raises(ConfigError, match="train_batch_size='four' must be of type int"):
        load_config(LoopConfig, overrides={"train_batch_size": "four"})
    with pytest.raises(ConfigError, match="mixed_precision='fp8' is not allowed; choose one of no, fp16, bf16"):
        load_config(LoopConfig, overrides={"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(LoopConfig, tmp_path / "missing.yaml")


def test_nonfinite_steps_are_skipped_on_the_device_and_stop_at_the_next_read(tmp_path):
    """With logging_steps > 1 the non-finite check never reads the device in between: fused AdamW skips the
    bad steps itself, and the run stops at the next read."""
    def weights_after_each_step(method: ToyMethod) -> list[list[torch.Tensor]]:
        snaps = []
        method.on_step_end = lambda model, done, out, acc: snaps.append([p.detach().clone() for p in model.parameters()])
        return snaps

    options = dict(checkpointing_steps=100, lr_warmup_steps=0, lr_scheduler="constant")
    bad = ToyMethod(nan_from=3)
    seen = weights_after_each_step(bad)
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive non-finite losses or gradients by step 6"):
        run_training(bad, cfg(tmp_path / "bad", max_nonfinite_steps=3, logging_steps=6, **options))
    good = ToyMethod()
    expected = weights_after_each_step(good)
    run_training(good, cfg(tmp_path / "good", max_train_steps=2, **options))
    assert len(seen) == 5 and not all(torch.equal(p, q) for p, q in zip(expected[0], expected[1]))
    for after_step in seen[1:]:  # steps 3-5 were non-finite: the weights stay exactly as step 2 left them
        assert all(torch.equal(p, q) for p, q in zip(after_step, expected[1]))
    assert not (tmp_path / "bad" / "run" / "model").exists()


def test_side_thread_budget_comes_from_the_cores_not_from_omp_num_threads(monkeypatch):
    """accelerate launch sets OMP_NUM_THREADS=1 on CPU machines; the side thread still uses a second core."""
    from stepdistill.training import side_thread
    from stepdistill.training.side_thread import SideThread, cores_per_process, side_thread_wanted

    monkeypatch.setattr(side_thread.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cores_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cores_per_process() == 1 and not side_thread_wanted(None) or torch.cuda.is_available()
    assert side_thread_wanted(True) and not side_thread_wanted(False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what accelerate launch leaves a CPU process with
    side = SideThread()
    try:
        threads_in_side = side.submit(torch.get_num_threads).result()
        assert torch.get_num_threads() == 2 and threads_in_side == 2  # 4 cores split 2 + 2
    finally:
        side.close()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)


@pytest.mark.parametrize("num_threads, expected", [(0, 3), (2, 2)])
def test_training_uses_the_cores_not_omp_num_threads_and_restores_the_count(tmp_path, monkeypatch, num_threads, expected):
    """accelerate launch leaves a CPU process with one thread; on CPU-only machines every trainer still
    uses the cores it may (here a faked 3-core affinity) unless --num_threads says otherwise."""
    from stepdistill.training import side_thread

    monkeypatch.setattr(side_thread.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    if torch.cuda.is_available():
        pytest.skip("the core budget applies to CPU-only machines")
    method, seen = ToyMethod(), []
    compute_loss = method.compute_loss
    method.compute_loss = lambda *args: seen.append(torch.get_num_threads()) or compute_loss(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(method, cfg(tmp_path, max_train_steps=2, num_threads=num_threads))
        assert seen == [expected, expected] and torch.get_num_threads() == 1
        monkeypatch.setattr(side_thread.torch.cuda, "is_available", lambda: True)
        assert side_thread.thread_budget(0) == 1 and side_thread.thread_budget(4) == 4  # GPU machines: left alone
    finally:
        torch.set_num_threads(before)


def test_a_multi_process_request_that_starts_one_process_is_reported(tmp_path):
    """``accelerate launch --num_processes 2`` without GPUs starts one process (which would train at half the
    global batch); the loop's check sees that from the real launcher's environment, and stays quiet for one
    process asked for and for the shipped two-process CPU config, which starts two."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    # one os.write per line: accelerate's processes run unbuffered, and print's pieces would interleave
    probe.write_text("import os\nfrom stepdistill.training.launch_check import lone_process_warning\n"
                     "os.write(1, f'warning: {lone_process_warning(os.environ) is not None}\\n'.encode())\n")
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "multi_cpu_2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    plain = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    seen = {}
    for name, options in {"two asked, one started": ["--num_processes", "2", *plain],
                          "two-process config": ["--config_file", str(config), "--main_process_port", "29547"]}.items():
        ran = subprocess.run([*launch, *options, str(probe)], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:]
        seen[name] = [line for line in ran.stdout.splitlines() if line.startswith("warning:")]
    assert seen == {"two asked, one started": ["warning: True"], "two-process config": ["warning: False", "warning: False"]}
    from stepdistill.training.launch_check import lone_process_warning

    one_asked = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}  # no MASTER_ADDR for one process
    assert lone_process_warning(one_asked) is None and lone_process_warning({}) is None
