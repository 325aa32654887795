"""SIGKILL at random points, then resume: every trainer ends with the uninterrupted run's weights."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
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
