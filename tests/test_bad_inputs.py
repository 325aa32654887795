"""The bad-input battery: each wrong value across CLIs, configs and data gets a one-line error naming it,
exit status 2, and leaves earlier results untouched."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / {"sweep": "eval"}.get(name, "train_scripts") / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the battery points at: an earlier run to protect, broken configs and datasets, a foreign LoRA."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "earlier_run"  # results of an earlier LCM run that no failed command may touch
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "stepdistill_checkpoint.json").write_text(json.dumps({"step": 10, "trainer": "progressive"}))
    (run / "lora").mkdir()
    save_file({"w": torch.ones(2)}, str(run / "lora" / "pytorch_lora_weights.safetensors"))
    (root / "unknown_key.yaml").write_text("learning_rate: 1.0e-4\nbogus_option: 3\n")
    (root / "not_mapping.yaml").write_text("- 1\n- 2\n")
    (root / "a_file").write_text("not a folder")
    (root / "no_pipeline").mkdir()
    broken = root / "broken_images"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "rocket"}) + "\n")
    empty = root / "empty_captions"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    foreign = root / "sd_lora"  # a LoRA written for the UNet teacher
    foreign.mkdir()
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64)},
              str(foreign / "pytorch_lora_weights.safetensors"))
    (foreign / "stepdistill_student.json").write_text(json.dumps({"teacher_class": "StableDiffusionPipeline"}))
    wrong_shape = root / "sd3_shaped_lora"  # right class name claimed, wrong layer names
    wrong_shape.mkdir()
    save_file({"unet.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128)},
              str(wrong_shape / "pytorch_lora_weights.safetensors"))
    np.savez_compressed(root / "empty.npz", images=np.zeros((0, 32, 32, 3), np.uint8), captions=np.array([], dtype=str))
    return root


def R(name):  # noqa: N802 - placeholder for a path under the fixture folder
    return f"@{name}"


CASES = [
    # (script, argv, what the one-line error must contain)
    ("train_lcm", ["--learning_rat", "1e-4"], "unknown option 'learning_rat'"),
    ("train_lcm", ["--config", R("unknown_key.yaml")], "unknown option 'bogus_option'"),
    ("train_lcm", ["--config", R("missing.yaml")], "does not exist"),
    ("train_lcm", ["--config", R("not_mapping.yaml")], "must hold a mapping"),
    ("train_lcm", ["--max_train_steps", "abc"], "max_train_steps='abc' must be of type int"),
    ("train_lcm", ["--snr_gamma", "-1"], "snr_gamma=-1.0 must be positive"),
    ("train_lcm", ["--logging_steps", "0"], "logging_steps=0 must be at least 1"),
    ("train_lcm", ["--train_batch_size", "2.5"], "train_batch_size='2.5' must be of type int"),
    ("train_lcm", ["--use_lora", "maybe"], "use_lora='maybe' must be true or false"),
    ("train_lcm", ["--loss_type", "l1"], "loss_type='l1' is not allowed"),
    ("train_lcm", ["--mixed_precision", "fp8"], "mixed_precision='fp8' is not allowed"),
    ("train_lcm", ["--report_to", "comet"], "report_to='comet' is not allowed"),
    ("train_lcm", ["--lora_rank", "0"], "lora_rank=0 must be at least 1"),
    ("train_lcm", ["--lora_forward", "merged"], "lora_forward='merged' is not allowed; choose one of branched, folded"),
    ("train_lcm", ["--lora_forward", "folded", "--gradient_checkpointing", "true"],
     "lora_forward=folded cannot be combined with gradient_checkpointing=true"),
    ("train_lcm", ["--w_min", "-1", "--w_max", "2"], "w_min=-1.0"),
    ("train_lcm", ["--num_ddim_timesteps", "0"], "num_ddim_timesteps=0"),
    ("train_lcm", ["--max_train_steps", "0"], "max_train_steps=0 must be at least 1"),
    ("train_lcm", ["--learning_rate", "-1e-4"], "learning_rate=-0.0001 must be positive"),
    ("train_lcm", ["--pretrained_teacher_model", R("missing_teacher")], "is not a diffusers pipeline folder"),
    ("train_lcm", ["--pretrained_teacher_model", R("no_pipeline")], "no model_index.json"),
    ("train_lcm", ["--dataset", R("broken_images")], "has no readable images (skipped 1 samples (1 unreadable image))"),
    ("train_lcm", ["--dataset", R("empty_captions")], "has no readable images"),
    ("train_lcm", ["--dataset", R("empty.npz")], "has no readable images"),
    ("train_lcm", ["--dataset", R("missing_data")], "dataset"),
    ("train_lcm", ["--resolution", "64"], "does not match the teacher VAE's sample_size 32"),
    ("train_lcm", ["--output_dir", R("a_file")], "is a file"),
    ("train_lcm", ["--output_dir", R("earlier_run")], "already holds results"),
    ("train_lcm", ["--output_dir", R("earlier_run"), "--resume_from_checkpoint", "latest"], "written by trainer 'progressive', not 'lcm'"),
    ("train_lcm", ["--resume_from_checkpoint", R("missing_ckpt")], "is not a complete stepdistill checkpoint"),
    ("train_lcm", ["--use_8bit_adam"], "use_8bit_adam=true needs a CUDA GPU"),
    ("train_lcm", ["--enable_xformers_memory_efficient_attention"], "needs a CUDA GPU"),
    ("train_progressive", ["--start_steps", "6", "--end_steps", "4"], "start_steps=6, end_steps=4"),
    ("train_progressive", ["--num_threads", "-1"], "num_threads=-1 must be 0"),
    ("train_ladd", ["--student_steps", "0,4"], "student_steps=[0, 4]"),
    ("train_ladd", ["--gan_loss", "wasserstein"], "gan_loss='wasserstein' is not allowed"),
    ("train_ladd", ["--adversarial_weight", "0", "--distill_weight", "0"], "at least one > 0"),
    ("sweep", ["--students", "x=" + R("no_pipeline")], "holds neither"),
    ("sweep", ["--teacher", "tiny-sd3", "--students", "x=" + R("sd_lora")], "was trained for a StableDiffusionPipeline"),
    ("sweep", ["--students", "x=" + R("sd3_shaped_lora")], "does not fit"),
    ("sweep", ["--student_steps", "0"], "student_steps contains 0"),
    ("stepdistill", ["sample", "--steps", "0"], "--steps 0 is not allowed"),
    ("stepdistill", ["sample", "--guidance_scale", "-2"], "--guidance_scale -2.0 is not allowed"),
]


@pytest.mark.parametrize("script,argv,expected", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input_gives_one_line_error_and_touches_nothing(files, tmp_path, capsys, script, argv, expected):
    argv = [a.replace("@", str(files) + "/") if a.startswith("@") or "=@" in a else a for a in argv]
    argv = [a.replace("=@", "=" + str(files) + "/") for a in argv]
    if script.startswith("train_") and "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "new_run")]
    if script == "sweep":
        argv += ["--output_dir", str(tmp_path / "sweep"), "--num_prompts", "4", "--seeds", "0"]
    if script == "stepdistill":
        argv += ["--out", str(tmp_path / "x.png")]
    before = _tree_digest(files)
    if script == "stepdistill":
        from stepdistill.cli import main
    else:
        main = _script_main(script)
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert _tree_digest(files) == before  # the earlier run and every input are untouched
    assert not (tmp_path / "new_run" / "lora").exists() and not (tmp_path / "x.png").exists()


def test_the_battery_is_big_enough():
    assert len(CASES) >= 20



@pytest.mark.parametrize("script,config", [("train_lcm", "stepdistill.methods.lcm:LCMConfig"),
                                           ("train_progressive", "stepdistill.methods.progressive:ProgressiveConfig"),
                                           ("train_ladd", "stepdistill.methods.ladd:LADDConfig"),
                                           ("sweep", "stepdistill.evaluation.sweep:SweepConfig")])
def test_help_lists_every_option_with_its_default_and_text(script, config, capsys):
    import dataclasses
    import importlib

    from stepdistill.config import field_help

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit) as stop:
        _script_main(script)(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    for f in dataclasses.fields(cls):
        assert f"--{f.name} (" in out, f.name
    notes = field_help(cls)
    assert len(notes) >= 0.8 * len(dataclasses.fields(cls))  # almost every option explains itself
    assert all(f"      {text}" in out for text in notes.values())
