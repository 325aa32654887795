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


def test_full_size_pipeline_has_sd15s_published_parameter_counts():
    """The GPU checks time SD1.5's architecture with random weights; the parameter counts of SD1.5's
    released UNet, CLIP ViT-L/14 text tower and KL-f8 VAE pin that every shape is the real one."""
    from accelerate import init_empty_weights

    from stepdistill.testbed.full_size import CLIP_CONTEXT, caption_tokenizer_77, sd15_text_encoder, sd15_unet, sd15_vae

    tokenizer = caption_tokenizer_77()
    assert tokenizer.model_max_length == CLIP_CONTEXT == 77
    from stepdistill.testbed.tokenizer import caption_words

    caption = load_emoji32().captions[0]
    assert len(tokenizer(caption).input_ids) == len(caption_words([caption])) + 2  # a token per word, <bos>, <eos>
    with init_empty_weights():  # shapes only: no 4 GB of random numbers
        counts = [sum(p.numel() for p in net.parameters()) for net in (sd15_unet(), sd15_text_encoder(tokenizer), sd15_vae())]
    assert counts == [859_520_964, 123_060_480, 83_653_863]


def test_full_size_pipeline_folder_is_written_whole_and_never_over_another(tmp_path, monkeypatch, capsys):
    from stepdistill.testbed import full_size, shipped_teacher_path

    tiny = StableDiffusionPipeline.from_pretrained(shipped_teacher_path("tiny-sd"), dtype=torch.float32)
    monkeypatch.setattr(full_size, "build_sd15_random_pipeline", lambda seed=0: tiny)  # the saving, not the 4 GB
    assert full_size.main(["--output_dir", str(tmp_path / "sd15"), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15", dtype=torch.float32)
    torch.testing.assert_close(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight.to(torch.bfloat16).float())
    on_disk = load_file(tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16} and not list(tmp_path.glob(".tmp-*"))
    assert full_size.main(["--output_dir", str(tmp_path / "sd15")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"output_dir={str(tmp_path / 'sd15')!r} already exists and is not an "
                                                   "empty folder; give a new one")
    assert full_size.main(["--output_dir", str(tmp_path / "other"), "--dtype", "int8"]) == 2
    assert "dtype='int8' is not known; allowed: fp32, fp16, bf16" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_full_size_tiny_decoder_is_taesds_architecture_and_is_written_alone(tmp_path, capsys):
    """``--tiny_decoder_dir`` writes the TAESD-architecture decoder the sampling benchmark can time SD1.5 with;
    it needs no pipeline, and a command that writes nothing, or over a folder, is refused in one line."""
    from stepdistill.evaluation.decoder_swap import load_decoder, upsampling_factor
    from stepdistill.testbed import full_size

    assert full_size.main(["--tiny_decoder_dir", str(tmp_path / "taesd")]) == 0
    decoder = load_decoder(tmp_path / "taesd")
    assert type(decoder).__name__ == "AutoencoderTiny" and upsampling_factor(decoder) == 8
    assert sum(p.numel() for p in decoder.decoder.parameters()) == 1_222_531  # TAESD's decoder
    assert not (tmp_path / "sd15").exists() and not list(tmp_path.glob(".tmp-*"))
    assert full_size.main(["--tiny_decoder_dir", str(tmp_path / "taesd"), "--output_dir", str(tmp_path / "sd15")]) == 2
    assert "tiny_decoder_dir=" in capsys.readouterr().err and not (tmp_path / "sd15").exists()
    assert full_size.main([]) == 2
    assert capsys.readouterr().err.strip() == ("error: nothing to write: give --output_dir (the pipeline), "
                                               "--tiny_decoder_dir (the decoder) or both")


def test_dataset_encoding_chunks_shrink_with_the_resolution():
    """64 images of 512 px in one VAE call took 24 GB on the CPU (killed); the testbed keeps its 64."""
    from types import SimpleNamespace

    from stepdistill.methods.latent_data import encode_images

    calls = []

    class CountingVAE(torch.nn.Module):
        def __init__(self, size: int):
            super().__init__()
            self.config = SimpleNamespace(sample_size=size, scaling_factor=0.5, get=lambda key: None)
            self.device, self.dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            calls.append(x.shape[0])
            mean = x[:, :, ::8, ::8] + 1
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mean))

    for size, count, chunks in ((512, 3, [1, 1, 1]), (32, 100, [64, 36]), (128, 20, [16, 4])):
        calls.clear()
        vae = CountingVAE(size)
        teacher = SimpleNamespace(pipe=SimpleNamespace(vae=vae), schedule=SimpleNamespace(kind="vp"))
        pixels = torch.rand(count, 3, size, size)
        latents = encode_images(teacher, pixels)
        assert calls == chunks and torch.equal(latents, (pixels[:, :, ::8, ::8] + 1) * 0.5)


@pytest.mark.parametrize("parts, message", [
    ("training bogus", "error: PARTS names 'bogus'; allowed: training, sampling, reference"),
    ("training", "error: eval/gpu_check.sh needs a CUDA GPU; torch.cuda.is_available() is False"),
])
def test_gpu_check_refuses_bad_parts_and_a_machine_without_cuda(tmp_path, parts, message):
    """The GPU check is only run on a scarce GPU machine: a bad part name or a CPU machine is one line and
    nothing written, before any model is built."""
    import os
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script = Path(__file__).resolve().parents[1] / "eval" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "out"), str(tmp_path / "work")], capture_output=True,
                          text=True, env={**os.environ, "PARTS": parts, "PYTHON": sys.executable})
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
