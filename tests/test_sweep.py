"""The step sweep end to end on a small random teacher: rows, report files, and self-consistency."""
from __future__ import annotations

import json

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
