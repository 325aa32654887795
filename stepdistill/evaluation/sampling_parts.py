"""Where a sampling call's time goes: prompt encoding, one denoiser pass, one guided (CFG) pass and the VAE
decode, each timed alone at the same images-per-call. With these parts the speed-up a k-step student can
reach over an N-step CFG teacher follows without running either, which tells a missed speed-up target
caused by the network (the NFE ratio) apart from one caused by the fixed per-call work both pay."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from stepdistill.sampling import decode, initial_noise
from stepdistill.teacher import TeacherWrapper


def _wait_for_gpu() -> None:
    """CUDA kernels run after the call returns; a timer must wait for them (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _wait_for_gpu()
        start = time.perf_counter()
        fn()
        _wait_for_gpu()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def sampling_parts_ms(teacher: TeacherWrapper, batch_size: int, guidance_scale: float = 4.0,
                      repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call at ``batch_size`` images: ``encode`` (the prompts), ``encode_cfg`` (prompts and
    the empty prompt), ``pass`` (one denoiser evaluation), ``cfg_pass`` (one guided evaluation as the pipeline
    runs it: a batch of 2 x ``batch_size``; two passes one after the other for Flux's true CFG; one pass where
    a guidance embedding reads the scale) and ``decode`` (the VAE)."""
    prompts = ["rocket"] * batch_size
    x = initial_noise(teacher, batch_size, seed=0).to(next(teacher.model.parameters()).device)
    t = torch.full((batch_size,), teacher.schedule.num_train_timesteps // 2)
    embeds = teacher.encode_prompts(prompts)
    uncond = teacher.empty_prompt(batch_size)
    return {
        "encode": median_ms(lambda: teacher.encode_uncached(prompts), repeats),
        "encode_cfg": median_ms(lambda: (teacher.encode_uncached(prompts), teacher.encode_uncached([""] * batch_size)),
                                repeats),  # a pipeline encodes the negative prompts in a second call
        "pass": median_ms(lambda: teacher.predict(x, t, embeds), repeats),
        "cfg_pass": median_ms(lambda: teacher.predict(x, t, embeds, guidance_scale, uncond=uncond,
                                                      batched_guidance=not teacher.is_flux), repeats),
        "decode": median_ms(lambda: decode(teacher, x), repeats),
    }


def predicted_speedup(parts: dict[str, float], student_steps: int, teacher_steps: int = 50) -> dict[str, float]:
    """The speed-up of a ``student_steps`` student (one pass per step) over a ``teacher_steps`` CFG teacher
    implied by the parts: ``with_fixed_costs`` counts the encode and decode both pay, ``network_only`` the
    denoiser alone (at most teacher_steps * 2 / student_steps, less where a CFG pass costs under two passes)."""
    teacher = parts["encode_cfg"] + teacher_steps * parts["cfg_pass"] + parts["decode"]
    student = parts["encode"] + student_steps * parts["pass"] + parts["decode"]
    return {"with_fixed_costs": teacher / student,
            "network_only": teacher_steps * parts["cfg_pass"] / (student_steps * parts["pass"])}
