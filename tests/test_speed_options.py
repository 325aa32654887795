"""Speed options of the shared loop: no device reads between logging steps, torch.compile and channels_last
leave the numbers unchanged."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from method_runs import train_method
from stepdistill.methods.ladd import LADDConfig, LADDMethod
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod
from stepdistill.sampling import initial_noise


class ScalarReads(TorchDispatchMode):
    """Counts tensor-to-Python-number conversions (item, float, int, bool: a host-device sync on a GPU) per step."""

    def __init__(self) -> None:
        super().__init__()
        self.step, self.reads = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[self.step] += 1
        return func(*args, **(kwargs or {}))


def count_reads(method_cls: type, mode: ScalarReads) -> type:
    """``method_cls`` whose steps tell ``mode`` which (1-based) step is running."""
    class Counted(method_cls):
        def compute_loss(self, model, batch, rand):
            mode.step = rand.step + 1
            return super().compute_loss(model, batch, rand)
    return Counted


TRAINERS = {
    # dispatch modes are thread-local: the sequential run puts every pass on the counted thread
    "lcm-adversarial": (LCMConfig, LCMMethod, dict(adversarial_weight=0.1, disc_r1_weight=0.1, overlap_teacher=False)),
    "lcm-overlapped": (LCMConfig, LCMMethod, dict(use_target_network=True, overlap_teacher=True)),
    "ladd": (LADDConfig, LADDMethod, dict(real_data="real", distill_weight=1.0)),
    "ladd-deterministic": (LADDConfig, LADDMethod, dict(student_sampler="deterministic", deterministic_loss="final",
                                                        student_steps=[2, 4], real_data="real", distill_weight=1.0)),
    "progressive": (ProgressiveConfig, ProgressiveMethod, dict(start_steps=8, end_steps=4, iterations_per_round=6)),
}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_no_device_reads_between_logging_steps(random_teachers, tmp_path, trainer):
    config_cls, method_cls, options = TRAINERS[trainer]
    mode = ScalarReads()
    with mode:
        train_method(config_cls, count_reads(method_cls, mode), random_teachers / "sd", tmp_path / "run",
                     max_train_steps=6, logging_steps=3, checkpointing_steps=100, **options)
    assert all(mode.reads[step] == 0 for step in (1, 2, 4, 5)), dict(mode.reads)
    assert mode.reads[3] > 0 and mode.reads[6] > 0  # the counter sees the logging reads


def test_channels_last_gives_the_same_training_numbers(random_teachers, tmp_path):
    outputs = {}
    for channels_last in (False, True):
        method = train_method(LCMConfig, LCMMethod, random_teachers / "sd", tmp_path / str(channels_last),
                              channels_last=channels_last, max_train_steps=3, learning_rate=1e-4)
        assert method.student_net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        x = initial_noise(method.teacher, 2, seed=0)
        with torch.no_grad():
            embeds = method.teacher.encode_prompts(["red apple", "sun"])
            outputs[channels_last] = method.teacher.with_model(method.student_net).predict(x, torch.tensor([500, 900]), embeds).x0
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-3, atol=1e-4)


def test_torch_compile_compiles_in_place_and_trains_the_same(tmp_path):
    from test_training_loop import ToyMethod, cfg, exported
    from stepdistill.training.loop import run_training

    eager, compiled = ToyMethod(), ToyMethod()
    eager_logs = run_training(eager, cfg(tmp_path / "eager"))
    compiled_logs = run_training(compiled, cfg(tmp_path / "compiled", torch_compile=True))
    assert compiled.net._compiled_call_impl is not None and eager.net._compiled_call_impl is None
    assert abs(compiled_logs["loss"] - eager_logs["loss"]) < 1e-5 * max(1.0, abs(eager_logs["loss"]))
    weights, reference = exported(tmp_path / "compiled"), exported(tmp_path / "eager")
    assert weights.keys() == reference.keys()  # in place: no `_orig_mod.` prefix in checkpoints or exports
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-6)


def test_torch_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    from stepdistill.errors import ConfigError
    from stepdistill.training import accel

    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    monkeypatch.setattr(accel.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"torch_compile=true on a CPU needs a C\+\+ compiler"):
        accel.speed_up_networks([torch.nn.Linear(2, 2)], compile_networks=True, channels_last=False)


def test_compiled_lora_network_matches_eager_with_the_adapter_on_and_off(random_teachers, tmp_path):
    """LCM-LoRA calls one compiled network in three modes (training; no-grad teacher pass with the adapter
    disabled; no-grad target pass with it on): each must give the eager numbers, not a stale graph. (Checked
    with inductor by hand on the shipped teacher: 168 s of compiling, outputs within 1e-4.)"""
    from stepdistill.methods.common import adapters_disabled

    method = train_method(LCMConfig, LCMMethod, random_teachers / "sd", tmp_path / "run", max_train_steps=2)
    net, teacher = method.student_net, method.teacher
    x = initial_noise(teacher, 2, seed=0)
    t, embeds = torch.tensor([300, 800]), teacher.encode_prompts(["red apple", "sun"])

    def three_modes() -> list[torch.Tensor]:
        trained = teacher.with_model(net).predict(x, t, embeds).x0.detach()
        with torch.no_grad():
            with adapters_disabled(net, True):
                off = teacher.predict(x, t, embeds, guidance_scale=4.0).x0
            on = teacher.predict(x, t, embeds).x0
        return [trained, off, on]

    eager = three_modes()
    with torch.no_grad(), adapters_disabled(net, True):
        assert (teacher.predict(x, t, embeds).x0 - eager[2]).abs().max() > 1e-3  # the trained adapter matters
    net.compile(dynamic=False, backend="aot_eager")  # the guards under test are dynamo's; skip inductor's C++ build
    for _ in range(2):  # second round: cached graphs, re-entered in a different order
        for got, want in zip(three_modes(), eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sampling_compile_keeps_the_pipeline_output_at_every_batch_size(random_teachers):
    """The sampling benchmark's ``--sampling_compile`` compiles each pipeline's denoiser and VAE decoder in
    place: a pipeline call must give the eager images at each images-per-call size (each its own graph), and
    the recompile limit must be raised so that a long benchmark does not fall back to eager unnoticed."""
    from stepdistill.teacher import load_teacher
    from stepdistill.testbed.tiny_models import LATENT_CHANNELS, LATENT_SIZE
    from stepdistill.training.accel import SAMPLING_RECOMPILE_LIMIT, compile_for_sampling

    pipe = load_teacher(random_teachers / "sd").pipe  # a fresh copy: compiling is in place

    def images(batch: int) -> torch.Tensor:
        latents = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(batch))
        return pipe(["red apple"] * batch, num_inference_steps=2, guidance_scale=4.0, latents=latents,
                    output_type="pt").images

    eager = {batch: images(batch) for batch in (1, 3)}
    compile_for_sampling(pipe, backend="aot_eager")  # dynamo's graphs and guards are under test, not inductor's C++
    assert pipe.unet._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    config = torch._dynamo.config
    assert getattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit") >= SAMPLING_RECOMPILE_LIMIT
    for batch in (1, 3, 1):
        torch.testing.assert_close(images(batch), eager[batch], rtol=1e-4, atol=1e-4)


def test_sampling_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    from stepdistill.errors import ConfigError
    from stepdistill.training import accel

    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    monkeypatch.setattr(accel.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--sampling_compile true on a CPU needs a C\+\+ compiler"):
        accel.compile_for_sampling(object())
