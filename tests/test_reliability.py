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
