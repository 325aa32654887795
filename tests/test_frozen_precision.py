"""--teacher_precision: the frozen (no-grad) teacher and target passes run under autocast, the student's
training pass keeps the step's own precision, on the main thread and on LCM's side thread alike.
--teacher_weight_dtype: the teacher's weights stored in half precision, the trainable ones in fp32."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from method_runs import FAST_RUN, small_data
from stepdistill.config import parse_cli
from stepdistill.errors import ConfigError
from stepdistill.methods.latent_data import LatentPromptData
from stepdistill.methods.ladd import LADDConfig
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod
from stepdistill.teacher import load_teacher
from stepdistill.training.loop import run_training
from stepdistill.training.step_random import StepRandom


def build(config_cls: type, method_cls: type, teacher_dir: Path, out: Path, **options):
    fields = {f.name for f in dataclasses.fields(config_cls)}
    base = {k: v for k, v in FAST_RUN.items() if k in fields}
    cfg = config_cls(**{**base, "pretrained_teacher_model": str(teacher_dir), "output_dir": str(out), **options})
    cfg.validate()
    teacher = load_teacher(teacher_dir, max_sequence_length=8)
    return cfg, method_cls(cfg, teacher, LatentPromptData.from_images(teacher, small_data()))


def record_pass_precision(method) -> set[tuple[bool, torch.dtype | None]]:
    """Hooks on every network the method runs: one (grad enabled, autocast dtype or None) entry per kind of pass."""
    seen: set[tuple[bool, torch.dtype | None]] = set()

    def hook(_module, _args):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.add((torch.is_grad_enabled(), dtype))

    for net in method.networks():
        net.register_forward_pre_hook(hook)
    return seen


CASES = {
    "lcm-lora-sequential": (LCMConfig, LCMMethod, dict(overlap_teacher=False)),
    "lcm-lora-side-thread": (LCMConfig, LCMMethod, dict(overlap_teacher=True, num_threads=2)),
    "lcm-full-side-thread": (LCMConfig, LCMMethod, dict(use_lora=False, overlap_teacher=True, num_threads=2)),
    "progressive-all-phases": (ProgressiveConfig, ProgressiveMethod,
                               dict(start_steps=4, end_steps=1, guidance_distillation_steps=2, iterations_per_round=2,
                                    max_train_steps=0, w_min=2.0, w_max=2.0)),
}


# every case in bf16; the default (no autocast anywhere) on one LCM and the progressive case
RUNS = [(case, "bf16") for case in CASES] + [("lcm-lora-side-thread", "same"), ("progressive-all-phases", "same")]


@pytest.mark.parametrize("case,precision", RUNS)
def test_frozen_passes_run_in_the_asked_precision_and_the_student_in_its_own(random_teachers, tmp_path, case, precision):
    config_cls, method_cls, options = CASES[case]
    threads = torch.get_num_threads()
    try:
        cfg, method = build(config_cls, method_cls, random_teachers / "sd", tmp_path / "run", teacher_precision=precision,
                            **options)
        seen = record_pass_precision(method)
        run_training(method, cfg)
    finally:
        torch.set_num_threads(threads)
    frozen = None if precision == "same" else torch.bfloat16
    assert seen == {(True, None), (False, frozen)}


def test_bf16_teacher_moves_the_lcm_loss_by_rounding_only(random_teachers, tmp_path):
    """Same draws, teacher and target in fp32 and in bf16: the loss changes (autocast really took effect)
    but only by bf16 rounding."""
    _, method = build(LCMConfig, LCMMethod, random_teachers / "sd", tmp_path / "run", overlap_teacher=False,
                      loss_type="l2", train_batch_size=8)
    batch = method.make_batch(list(range(8)), torch.device("cpu"))
    losses = {}
    for precision in ("same", "bf16"):
        method.cfg.teacher_precision = precision
        rand = StepRandom(0, 0, 0, 1, 8, torch.device("cpu"))
        losses[precision] = method.compute_loss(method.student_net, batch, rand)[0].item()
    assert losses["same"] != losses["bf16"]
    assert abs(losses["bf16"] - losses["same"]) < 0.05 * losses["same"]


def test_unknown_teacher_precision_is_refused():
    with pytest.raises(ConfigError, match="teacher_precision.*fp8"):
        parse_cli(LCMConfig, ["--teacher_precision", "fp8"])


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_the_hardware_does_bf16_math(monkeypatch, native):
    from stepdistill.methods import common

    monkeypatch.setattr(common, "has_native_bf16", lambda device_type: native)
    with LCMConfig(teacher_precision="auto").frozen_autocast(torch.device("cpu")):
        in_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert in_bf16 == native


def test_bf16_asked_for_on_a_cpu_that_emulates_it_warns_and_is_still_honoured(monkeypatch):
    from stepdistill.methods import common

    monkeypatch.setattr(common, "has_native_bf16", lambda device_type: False)
    with pytest.warns(UserWarning, match="teacher_precision=bf16 on a cpu without native bf16"):
        with LCMConfig(teacher_precision="bf16").frozen_autocast(torch.device("cpu")):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")




@pytest.mark.parametrize("kind", ["sd", "flux_dev"])
def test_lora_on_a_bf16_teacher_gets_the_fp32_teachers_gradient_in_fp32(random_teachers, tmp_path, kind):
    """--teacher_weight_dtype bf16 loads the teacher pipeline in bf16 (half its memory); the LCM-LoRA adapter on
    it stays fp32, and its gradient on one batch is the fp32 teacher's up to bf16 rounding."""
    from method_runs import build_method

    grads, losses = {}, {}
    for dtype in ("fp32", "bf16"):
        method = build_method(LCMConfig, LCMMethod, random_teachers / kind, tmp_path / dtype, teacher_weight_dtype=dtype,
                              w_min=3.0, w_max=3.0, overlap_teacher=False)
        net = method.student_net
        with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero, which would hide the fold
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        batch = method.make_batch(list(range(8)), torch.device("cpu"))
        loss, _ = method.compute_loss(net, batch, StepRandom(0, 0, 0, 1, 8, torch.device("cpu")))
        loss.backward()
        trainable = [p for p in net.parameters() if p.requires_grad]
        assert {p.dtype for p in trainable} == {torch.float32}
        assert {p.dtype for p in net.parameters() if not p.requires_grad} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        grads[dtype], losses[dtype] = torch.cat([p.grad.flatten() for p in trainable]), loss.item()
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.95 and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], (cosine, losses)

def test_progressive_student_on_a_bf16_teacher_is_fp32_and_learns(random_teachers, tmp_path):
    """A full fp32 student (and its EMA copy) beside a bf16 teacher: its 1-step samples approach the bf16
    teacher's guided 2-step ones. (A flow teacher: an epsilon UNet's 1-step sample from pure noise enlarges
    its errors 15x, which hides the progress of 60 steps on a random teacher.)"""
    from method_runs import build_method
    from stepdistill.sampling import sample_latents

    method = build_method(ProgressiveConfig, ProgressiveMethod, random_teachers / "flux_dev", tmp_path / "run",
                          teacher_weight_dtype="bf16", start_steps=2, end_steps=1, iterations_per_round=60,
                          max_train_steps=0, learning_rate=1e-3, w_min=2.0, w_max=2.0, checkpointing_steps=1000)
    assert {p.dtype for p in method.teacher.pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for net in (method.student_net, method.ema_net) for p in net.parameters()} == {torch.float32}
    prompts, start = ["rocket", "sun", "red apple", "hamster face"], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    target = sample_latents(method.teacher, prompts, 2, 3.0, start)
    before = (method.sample(method.student_net, prompts, 1, start) - target).pow(2).mean()
    run_training(method, method.cfg)
    after = (method.sample(method.student_net, prompts, 1, start) - target).pow(2).mean()
    assert after < 0.5 * before, (before, after)

def test_folded_lora_refuses_a_half_precision_teacher_in_one_line():
    for cls in (LCMConfig, LADDConfig):
        with pytest.raises(ConfigError, match="^lora_forward=folded needs teacher_weight_dtype=fp32, not bf16 "):
            parse_cli(cls, ["--use_lora", "true", "--lora_forward", "folded", "--teacher_weight_dtype", "bf16",
                            "--output_dir", "unused"])

def test_unknown_teacher_weight_dtype_is_refused():
    with pytest.raises(ConfigError, match="^teacher_weight_dtype='int8' is not allowed; choose one of fp32, bf16, fp16"):
        parse_cli(LCMConfig, ["--teacher_weight_dtype", "int8", "--output_dir", "unused"])
