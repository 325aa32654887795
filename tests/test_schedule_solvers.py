"""Schedules and solver steps checked against diffusers' own schedulers, step for step."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.errors import ConfigError
from stepdistill.schedule import NoiseSchedule
from stepdistill.solvers import (ddim_prev_timestep, ddim_step, ddim_timesteps, euler_flow_step, few_step_timesteps,
                                 flow_sigmas, halving_pairs, lcm_skip_timesteps, sampling_grid, uniform_call_sigmas)
from stepdistill.teacher import output_to_prediction

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)


def ddim(spacing: str, prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**SD15, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                         prediction_type=prediction_type)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 7, 50])
def test_ddim_grid_matches_diffusers(spacing, steps):
    sched = ddim(spacing)
    sched.set_timesteps(steps)
    assert ddim_timesteps(steps, 1000, spacing, sched.config.steps_offset).tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddim_step_matches_ddim_scheduler_over_a_full_loop(prediction_type, spacing):
    sched = ddim(spacing, prediction_type)
    sched.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(sched)
    gen = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=gen)
    for t in sched.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=gen)  # any network output
        step = sched.step(out, t, theirs)
        pred = output_to_prediction(out, ours, *schedule.alpha_sigma(t), prediction_type)
        torch.testing.assert_close(pred.x0, step.pred_original_sample, atol=1e-4, rtol=1e-4)
        ours = ddim_step(pred, *schedule.alpha_sigma(ddim_prev_timestep(t, 10)))
        theirs = step.prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_grid_and_euler_step_match_flow_scheduler(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift), sched.sigmas.float())
    schedule = NoiseSchedule.from_scheduler(sched)
    torch.testing.assert_close(sampling_grid(schedule, steps)[:-1], sched.timesteps.float())
    gen = torch.Generator().manual_seed(1)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=gen)
    sigmas = flow_sigmas(steps, shift)
    for i, t in enumerate(sched.timesteps):
        velocity = torch.randn(2, 4, 8, 8, generator=gen)
        theirs = sched.step(velocity, t, theirs).prev_sample
        euler = euler_flow_step(ours, velocity, sigmas[i], sigmas[i + 1])
        # the DDIM update in flow parameterisation is the same Euler step
        pred = output_to_prediction(velocity, ours, *schedule.alpha_sigma(t), "flow")
        ours = ddim_step(pred, *schedule.alpha_sigma(sigmas[i + 1] * 1000))
        torch.testing.assert_close(ours, euler, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_few_step_flow_grid_is_what_the_scheduler_runs_with_uniform_sigmas_and_nests(shift):
    schedule = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))
    default = FlowMatchEulerDiscreteScheduler(shift=shift)
    default.set_timesteps(2)
    assert default.sigmas[1] < 0.01  # why: the default 2-step grid's second step starts almost clean
    grids = {}
    for steps in (1, 2, 4):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(sigmas=uniform_call_sigmas(steps))
        grids[steps] = few_step_timesteps(schedule, steps)
        torch.testing.assert_close(grids[steps], sched.timesteps.float())
    assert grids[1][0] == 1000 and grids[2][1] > 300  # the second of two steps starts from real noise
    assert set(grids[2].tolist()) <= set(grids[4].tolist()) and set(grids[1].tolist()) <= set(grids[2].tolist())
    with pytest.raises(ConfigError, match="num_steps=0"):
        uniform_call_sigmas(0)


def test_vp_sigma_matches_euler_scheduler_and_inverts():
    euler = EulerDiscreteScheduler(**{k: v for k, v in SD15.items() if k not in ("clip_sample", "set_alpha_to_one")})
    schedule = NoiseSchedule.from_scheduler(ddim("leading"))
    t = torch.arange(1000)
    expected = ((1 - euler.alphas_cumprod) / euler.alphas_cumprod).sqrt()
    torch.testing.assert_close(schedule.sigma(t), expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.timestep(schedule.sigma(t)), t.float(), atol=1e-3, rtol=0)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(1000))
    assert schedule.alpha_sigma(torch.tensor(-1))[0].item() == pytest.approx(euler.alphas_cumprod[0].sqrt().item())


def test_lcm_skip_grid_and_halving_pairs():
    assert lcm_skip_timesteps(50).tolist()[:3] == [19, 39, 59]
    assert lcm_skip_timesteps(50)[-1].item() == 999
    schedule = NoiseSchedule.from_scheduler(ddim("trailing"))
    student, teacher = halving_pairs(4, schedule)
    assert len(student) == 5 and len(teacher) == 9
    assert torch.equal(student[:-1], teacher[:-1:2])  # each student step starts where a teacher pair starts
    assert student[-1].item() == teacher[-1].item() == -1


@pytest.mark.parametrize("bad", [0, -3, 1001])
def test_bad_step_counts_are_rejected(bad):
    with pytest.raises(ConfigError, match=str(bad)):
        ddim_timesteps(bad)
    with pytest.raises(ConfigError, match="spacing 'weird'"):
        ddim_timesteps(4, spacing="weird")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_call_sigmas_make_flow_lcm_scheduler_call_the_lcm_grid(steps):
    """A flow LCM student's pipeline call: FlowMatchLCMScheduler at shift 1 given lcm_call_sigmas(N) calls the
    network at LCM's N-step timesteps on the flow grid (k, ..., T) and ends at sigma 0."""
    from diffusers import FlowMatchLCMScheduler

    from stepdistill.solvers import lcm_call_sigmas, lcm_inference_timesteps

    sd3_config = FlowMatchLCMScheduler(shift=3.0).config  # as built from an SD3 pipeline's scheduler
    scheduler = FlowMatchLCMScheduler.from_config(sd3_config, shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=lcm_call_sigmas(steps))
    expected = (lcm_inference_timesteps(steps) + 1).float()
    torch.testing.assert_close(scheduler.timesteps.float(), expected)
    assert scheduler.sigmas[-1] == 0 and expected[0] == 1000
