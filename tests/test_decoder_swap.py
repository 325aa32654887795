"""Sampling with another decoder than the pipeline's VAE (the benchmark's ``--sampling_decoder``)."""
from __future__ import annotations

from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny

from stepdistill.errors import ModelError
from stepdistill.evaluation.decoder_swap import load_decoder, upsampling_factor, use_decoder
from stepdistill.sampling import decode
from stepdistill.teacher import load_teacher
from stepdistill.testbed import shipped_teacher_path

BENCHMARK = Path(__file__).resolve().parents[1] / "eval" / "benchmark_speed.py"


def tiny_decoder(levels: int = 3, latent_channels: int = 4) -> AutoencoderTiny:
    """An AutoencoderTiny small enough for a test; ``levels`` sets its upsampling (2 ** (levels - 1))."""
    torch.manual_seed(0)
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8,) * levels,
                           decoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,
                           num_decoder_blocks=(1,) * levels).eval()


def load_benchmark():
    spec = spec_from_file_location("benchmark_speed", BENCHMARK)
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_swapped_decoder_is_what_the_pipeline_and_the_parts_decode_with(tmp_path):
    tiny_decoder().save_pretrained(tmp_path / "taesd", safe_serialization=True)
    decoder = load_decoder(tmp_path / "taesd")
    teacher = load_teacher(shipped_teacher_path("tiny-sd"))
    assert upsampling_factor(teacher.pipe.vae) == upsampling_factor(decoder) == 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    own = decode(teacher, latents)
    use_decoder([teacher.pipe], decoder)
    assert teacher.pipe.vae is decoder
    with torch.no_grad():
        swapped = decode(teacher, latents)
        expected = decoder.decode(latents / decoder.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(swapped, expected)
    assert swapped.shape == own.shape and not torch.allclose(swapped, own)
    images = teacher.pipe("rocket", num_inference_steps=2, output_type="pt", latents=latents[:1]).images
    assert images.shape == (1, 3, 32, 32)  # the pipeline's image size: the decoder fits its latents


def test_decoders_that_do_not_fit_the_latents_are_refused():
    teacher = load_teacher(shipped_teacher_path("tiny-sd"))
    own = teacher.pipe.vae
    with pytest.raises(ModelError, match="takes 8 latent channels; the pipeline's latents have 4"):
        use_decoder([teacher.pipe], tiny_decoder(latent_channels=8))
    with pytest.raises(ModelError, match="upsamples latents 8x; the pipeline's own VAE 4x"):
        use_decoder([teacher.pipe], tiny_decoder(levels=4))
    assert teacher.pipe.vae is own


def test_benchmark_times_teacher_and_students_with_the_given_decoder(tmp_path, monkeypatch):
    from stepdistill.evaluation import generate

    tiny_decoder().save_pretrained(tmp_path / "taesd", safe_serialization=True)
    seen, original = [], generate.Generator.images

    def recording(self, prompts, steps, noise, batch_size):
        seen.append((self.name, type(self.pipe.vae).__name__))
        return original(self, prompts, steps, noise, batch_size)

    monkeypatch.setattr(generate.Generator, "images", recording)
    rows, parts = load_benchmark().measure_sampling("tiny-sd", [f"same={shipped_teacher_path('tiny-sd')}"], [2], [1],
                                                    repeats=1, decoder=str(tmp_path / "taesd"))
    assert {name for name, _ in seen} == {"teacher", "same"} and {vae for _, vae in seen} == {"AutoencoderTiny"}
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher DDIM, CFG 4", 50), ("same", 2)]
    assert parts[0]["parts_ms"]["decode"] > 0


@pytest.mark.parametrize("content, message", [
    (None, "has no config.json; give an autoencoder saved with save_pretrained"),
    ('{"_class_name": "UNet2DConditionModel"}', "holds a UNet2DConditionModel; allowed: AutoencoderKL, AutoencoderTiny"),
])
def test_benchmark_refuses_a_folder_that_is_no_decoder(tmp_path, content, message):
    """Checked with the other options, before the output folder is made (``main`` calls check_args first)."""
    folder = tmp_path / "dec"
    folder.mkdir()
    if content:
        (folder / "config.json").write_text(content)
    bench = load_benchmark()
    args = bench.build_parser().parse_args(["--parts", "sampling", "--sampling_decoder", str(folder)])
    with pytest.raises(SystemExit) as stopped:
        bench.check_args(args, {"sampling"})
    assert stopped.value.code == f"error: --sampling_decoder: decoder folder {str(folder)!r} {message}"
    bench.check_args(bench.build_parser().parse_args(["--parts", "training", "--sampling_decoder", str(folder)]),
                     {"training"})  # not used, not checked


def test_demo_decodes_teacher_and_students_with_the_given_decoder(tmp_path, capsys):
    from stepdistill.cli import main
    from stepdistill.demo.backend import DemoBackend

    tiny_decoder().save_pretrained(tmp_path / "taesd", safe_serialization=True)
    backend = DemoBackend("tiny-sd", [f"same={shipped_teacher_path('tiny-sd')}"], decoder=str(tmp_path / "taesd"))
    assert backend.teacher.pipe.vae is backend.students[0].pipe.vae
    assert type(backend.teacher.pipe.vae).__name__ == "AutoencoderTiny"
    assert backend.decoder == "taesd"  # the page's heading names it
    shots = backend.run("rocket", seed=1, teacher_steps=2, extra_steps=1)
    assert [(s.model, s.steps) for s in shots][:2] == [("teacher (ddim)", 2), ("same", 1)]
    assert {s.image.size for s in shots} == {(256, 256)}  # 32 px, shown 8x: the pipeline's own image size
    tiny_decoder(levels=4).save_pretrained(tmp_path / "wide", safe_serialization=True)
    assert main(["demo", "--student", str(shipped_teacher_path("tiny-sd")), "--decoder", str(tmp_path / "wide")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars: one line, no traceback
    assert last.startswith("error: the decoder upsamples latents 8x; the pipeline's own VAE 4x")
