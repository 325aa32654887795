"""Testbed teachers: the caption tokenizer, the shipped data, and short real runs of train_teacher.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

from stepdistill.data.emoji32 import load_emoji32
from stepdistill.testbed.tokenizer import write_caption_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_shipped_emoji32():
    data = load_emoji32()
    assert data.images.shape == (1388, 32, 32, 3) and data.images.dtype == np.uint8
    assert "hamster face" in data.captions and len(set(data.captions)) == len(data.captions)
    assert 150 < data.images.mean() < 240 and (data.images[:, 0, 0] == 255).mean() > 0.8  # on white, not blank
    pixels = data.pixel_tensor()
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_caption_tokenizer_keeps_captions_distinct(tmp_path):
    captions = load_emoji32().captions
    tok = write_caption_tokenizer(captions, tmp_path)
    ids = [tuple(tok(c).input_ids) for c in captions]
    assert len(set(ids)) == len(captions)
    assert max(len(i) for i in ids) <= tok.model_max_length
    assert all(tok.eos_token_id not in i[1:-1] for i in ids)  # no unknown tokens (CLIP maps unk to EOS)
    assert tok.decode(tok("hamster face").input_ids, skip_special_tokens=True).strip() == "hamster face"


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    data = load_emoji32()
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez_compressed(path, images=data.images[:16], captions=np.array(data.captions[:16]))
    return path


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, small_dataset) -> Path:
    out = tmp_path_factory.mktemp("vae") / "run"
    rc = load_script("train_teacher").main(["--stage", "vae", "--dataset", str(small_dataset), "--output_dir", str(out),
                                            "--max_train_steps", "3", "--train_batch_size", "8", "--report_to", "none",
                                            "--validation_steps", "0"])
    assert rc == 0
    return out / "vae"


@pytest.mark.parametrize("kind,pipeline_cls", [("sd", StableDiffusionPipeline), ("sd3", StableDiffusion3Pipeline)])
def test_train_teacher_lowers_loss_and_saves_loadable_pipeline(tmp_path, small_dataset, trained_vae, kind, pipeline_cls, capsys):
    from stepdistill.testbed.teacher_training import TESTBED_SD3_MAX_SEQUENCE_LENGTH

    out = tmp_path / "teacher"
    args = ["--stage", "denoiser", "--kind", kind, "--dataset", str(small_dataset), "--vae_path", str(trained_vae),
            "--output_dir", str(out), "--train_batch_size", "16", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--report_to", "tensorboard", "--validation_steps", "0", "--checkpointing_steps", "20"]
    assert load_script("train_teacher").main(args + ["--max_train_steps", "1"]) == 0
    first = float(capsys.readouterr().out.split("final loss ")[1].split(";")[0])
    assert load_script("train_teacher").main(args + ["--max_train_steps", "40", "--overwrite_output_dir"]) == 0
    last = float(capsys.readouterr().out.split("final loss ")[1].split(";")[0])
    assert last < 0.8 * first
    assert list((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard by default
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = pipeline_cls.from_pretrained(out / "pipeline", dtype=torch.float32, **extra)
    weights = next((out / "pipeline").glob("*/diffusion_pytorch_model.safetensors"))
    from safetensors import safe_open
    with safe_open(weights, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # shipped in fp16
    call = {"max_sequence_length": TESTBED_SD3_MAX_SEQUENCE_LENGTH} if kind == "sd3" else {}
    image = pipe("hamster face", num_inference_steps=3, output_type="np", **call).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_denoiser_stage_without_vae_is_one_line_error(tmp_path, capsys):
    rc = load_script("train_teacher").main(["--vae_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "vae_path=" in err and "nope" in err
