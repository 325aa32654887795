"""SIGKILL at random points, then resume: every trainer ends with the uninterrupted run's weights."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_resume  # noqa: E402


@pytest.fixture(scope="module")
def kill_testbed(tmp_path_factory):
    return kill_resume.make_testbed(tmp_path_factory.mktemp("killbed"))


@pytest.mark.parametrize("trainer", ["lcm", "progressive", "ladd", "teacher"])
def test_sigkill_then_resume_gives_bitwise_identical_weights(kill_testbed, tmp_path, trainer):
    case = next(c for c in kill_resume.trainer_cases(*kill_testbed) if c.name == trainer)
    result = kill_resume.run_case(case, tmp_path, kills=2, rng=random.Random(sum(map(ord, trainer))))
    assert result["kills"] >= 1, result  # the run really was killed before it finished
    assert result["bitwise_identical"], result


def test_resume_loads_every_file_with_weights_only(tmp_path, monkeypatch):
    """accelerate's load_state reads optimizer, scheduler, RNG and EMA files through torch.load; all of them
    must go through the weights-only unpickler."""
    from test_training_loop import ToyMethod, cfg

    from stepdistill.training.loop import run_training

    run_training(ToyMethod(), cfg(tmp_path, max_train_steps=3, checkpointing_steps=3))
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    run_training(ToyMethod(), cfg(tmp_path, max_train_steps=4, checkpointing_steps=3, resume_from_checkpoint="latest"))
    assert len(calls) >= 3 and all(flag is True for flag in calls), calls


def test_no_remote_code_and_no_unsafe_loads_in_the_sources():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("stepdistill/**/*.py"), *root.glob("train_scripts/*.py"), *root.glob("eval/*.py")]:
        text = path.read_text()
        if "trust_remote_code" in text or "pickle.load" in text:
            offenders.append(str(path))
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders, offenders


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_what_was_complete(random_teachers, tmp_path, monkeypatch, capsys):
    """The disk fills while checkpoint-3 is written, then (after a resume) while the LoRA is exported: each time
    the script exits 2 with one line, the half-written folder is gone (a full disk would stay full) and the
    complete checkpoints are kept; the resume the message suggests then finishes the run."""
    import errno

    from accelerate import Accelerator
    from method_runs import small_npz
    from safetensors import SafetensorError
    from test_testbed_teachers import load_script

    from stepdistill.methods.lcm import LCMMethod
    from stepdistill.training.checkpoint import list_checkpoints

    out = tmp_path / "run"
    argv = ["--pretrained_teacher_model", str(random_teachers / "sd"), "--dataset", str(small_npz(tmp_path)),
            "--output_dir", str(out), "--max_train_steps", "3", "--checkpointing_steps", "2", "--train_batch_size", "4",
            "--validation_steps", "0", "--report_to", "none", "--lora_rank", "4", "--num_threads", "1"]
    script = load_script("train_lcm")
    real_save_state, real_export = Accelerator.save_state, LCMMethod.export

    def save_state_until_step_3(self, output_dir, **kwargs):
        real_save_state(self, output_dir, **kwargs)  # files land, then the last one fails, as on a full disk
        if output_dir.endswith("checkpoint-3"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def export_then_fail(self, model, folder):
        real_export(self, model, folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    def leftovers():
        return sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp"))

    monkeypatch.setattr(Accelerator, "save_state", save_state_until_step_3)
    assert script.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: no space left on device while writing checkpoint-3") and "resume" in lines[-1], lines
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"] and leftovers() == [] and not (out / "lora").exists()

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    monkeypatch.setattr(LCMMethod, "export", export_then_fail)
    resume = [*argv, "--resume_from_checkpoint", "latest"]
    assert script.main(resume) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no space left on device while writing") and str(out / "lora") in line, line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"] and leftovers() == []
    assert not (out / "lora").exists()

    monkeypatch.setattr(LCMMethod, "export", real_export)
    assert script.main(resume) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and leftovers() == []
