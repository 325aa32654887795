"""ODE-solver schedules and steps as small pure functions.

One update, ``ddim_step``, serves every method: x_next = alpha_next * x0 + sigma_next * eps (Song et al.
2021, eq. 12 with eta = 0). For rectified flow (alpha = 1 - sigma) it is exactly the Euler step
x + (sigma_next - sigma) * (eps - x0), so the same function drives flow teachers. Progressive distillation
(PD) and LCM build their targets from it; the samplers below use it too.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from stepdistill.errors import ConfigError
from stepdistill.schedule import NoiseSchedule
from stepdistill.teacher import Prediction, _bcast

SPACINGS = ("leading", "trailing", "linspace")


def ddim_step(pred: Prediction, alpha_next: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update to the next noise level from a prediction at the current one."""
    return _bcast(alpha_next, pred.x0) * pred.x0 + _bcast(sigma_next, pred.eps) * pred.eps


def euler_flow_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Euler step of the flow ODE dx/dsigma = v (what FlowMatchEulerDiscreteScheduler.step computes)."""
    return x + _bcast(sigma_next - sigma, x) * velocity


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Descending integer timesteps of an N-step DDIM grid, as ``DDIMScheduler.set_timesteps`` builds them."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"num_steps={num_steps} is out of range; allowed 1..{num_train_timesteps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        steps = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ConfigError(f"timestep spacing {spacing!r} is not known; allowed: {', '.join(SPACINGS)}")
    return torch.from_numpy(steps.copy())


def ddim_prev_timestep(t: torch.Tensor, num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIMScheduler's previous timestep t - T // N (negative means 'clean', see NoiseSchedule.alpha_sigma)."""
    return t - num_train_timesteps // num_steps


def lcm_skip_timesteps(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """LCM's skipping-step solver grid, ascending: k-1, 2k-1, ..., T-1 with k = T // N (Luo et al. 2023, sec. 4.3)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ConfigError(f"num_ddim_timesteps={num_ddim_timesteps} is out of range; allowed 1..{num_train_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def _shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending sigmas of an N-step flow Euler grid plus a final 0, exactly as
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds them (it spaces linearly down to the
    *shifted* training minimum, then shifts again)."""
    if num_steps < 1:
        raise ConfigError(f"num_steps={num_steps} is out of range; allowed 1 or more")
    sigma_min = float(_shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
    sigmas = _shift(torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


def sampling_grid(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
    """Model timesteps t_0 > ... > t_{N-1} followed by the end point (vp: -1 for clean, flow: 0).

    Trailing spacing starts at the last training timestep, which few-step samplers need (Lin et al. 2024).
    """
    if schedule.kind == "flow" and schedule.uniform_sigmas:
        return torch.cat([few_step_timesteps(schedule, num_steps), torch.zeros(1)])
    if schedule.kind == "flow":
        return flow_sigmas(num_steps, schedule.shift, schedule.num_train_timesteps) * schedule.num_train_timesteps
    steps = ddim_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset)
    return torch.cat([steps, torch.tensor([-1])]).float()


def deterministic_grid(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
    """The N-step grid a deterministic few-step student samples on, end point included: trailing DDIM (vp,
    what ``DDIMScheduler(timestep_spacing="trailing")`` samples) or Euler on the uniform flow grid of
    :func:`uniform_call_sigmas` (flow; diffusers' default grid wastes its last step)."""
    if schedule.kind == "flow":
        return torch.cat([few_step_timesteps(schedule, num_steps), torch.zeros(1)])
    return sampling_grid(schedule, num_steps, "trailing")


def halving_pairs(student_steps: int, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Progressive distillation grids (Salimans & Ho 2022, alg. 2): the student's N-step sampling grid and a
    2N-step teacher grid in which student step i spans teacher steps 2i and 2i+1.

    vp: trailing grids of N and 2N steps nest exactly, and the student's is what ``DDIMScheduler`` (trailing)
    samples. Flow: the uniform grids of :func:`uniform_call_sigmas`, which nest too; diffusers' default N-step
    grid neither nests in its 2N-step one nor ends with a useful step.
    """
    student, teacher = deterministic_grid(schedule, student_steps), deterministic_grid(schedule, 2 * student_steps)
    if not torch.equal(teacher[::2], student):
        raise ConfigError(f"trailing grids of {student_steps} and {2 * student_steps} steps do not nest; choose another step count")
    return student, teacher


Denoise = Callable[[torch.Tensor, torch.Tensor], Prediction]


def sample_ddim(denoise: Denoise, x: torch.Tensor, grid: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Run the deterministic solver along ``grid`` (from :func:`sampling_grid`); returns the final x."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        pred = denoise(x, t)
        alpha_next, sigma_next = schedule.alpha_sigma(t_next)
        x = ddim_step(pred, alpha_next.to(x.device), sigma_next.to(x.device))
    return x


def lcm_inference_timesteps(num_steps: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000) -> torch.Tensor:
    """LCMScheduler's N-step inference subset of the skipping grid (evenly spaced indices, descending)."""
    grid = lcm_skip_timesteps(num_ddim_timesteps, num_train_timesteps).flip(0)
    if not 1 <= num_steps <= num_ddim_timesteps:
        raise ConfigError(f"num_steps={num_steps} is out of range; allowed 1..{num_ddim_timesteps} (num_ddim_timesteps)")
    indices = np.floor(np.linspace(0, num_ddim_timesteps, num_steps, endpoint=False)).astype(np.int64)
    return grid[torch.from_numpy(indices)]


def uniform_call_sigmas(num_steps: int) -> list[float]:
    """The ``sigmas=`` a pipeline call passes to sample a few-step flow student: 1, (N-1)/N, ..., 1/N (the
    scheduler shifts them and appends 0).

    diffusers' default N-step flow grid ends with a step from sigma 0.001 to 0 that removes nothing, so
    N steps do the work of N-1 and 2 steps equal 1. On this grid every step removes 1/N of the noise and
    the 1-, 2- and 4-step grids nest, so a student trained for all three is trained at 4 noise levels."""
    if num_steps < 1:
        raise ConfigError(f"num_steps={num_steps} is out of range; allowed 1 or more")
    return [1.0 - i / num_steps for i in range(num_steps)]


def lcm_student_timesteps(schedule: NoiseSchedule, num_steps: int, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """Descending model timesteps an LCM student samples at: LCMScheduler's N-step subset of the skipping grid,
    on a flow schedule shifted up by one (its grid is k, 2k, ..., T, so that T is pure noise)."""
    timesteps = lcm_inference_timesteps(num_steps, num_ddim_timesteps, schedule.num_train_timesteps)
    return timesteps + 1 if schedule.kind == "flow" else timesteps


def lcm_call_sigmas(num_steps: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000) -> list[float]:
    """The ``sigmas=`` a pipeline call passes to sample a flow LCM student as stepdistill's consistency sampler
    does, with ``FlowMatchLCMScheduler`` at shift 1 (so the scheduler leaves them as they are): LCM's N-step
    timesteps on the flow grid (k, 2k, ..., T, see ``lcm.consistency_grid``) over T. That scheduler maps to x0,
    re-noises with fresh noise and ends on x0, as LCM's sampler does; its x0 leaves out the boundary-condition
    scalings, which change it by at most 6e-6 of its size (at t = k) and by under 2e-7 at 8 steps or fewer."""
    timesteps = lcm_student_timesteps(NoiseSchedule("flow", num_train_timesteps), num_steps, num_ddim_timesteps)
    return [float(t) / num_train_timesteps for t in timesteps]


def few_step_timesteps(schedule: NoiseSchedule, num_steps: int, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """Descending model timesteps a few-step student is called at: LCMScheduler's N-step schedule (vp), or
    FlowMatchEulerDiscreteScheduler's with ``sigmas=uniform_call_sigmas(N)`` (flow)."""
    if schedule.kind == "flow":
        sigmas = _shift(torch.tensor(uniform_call_sigmas(num_steps), dtype=torch.float64), schedule.shift)
        return (sigmas * schedule.num_train_timesteps).float()
    return lcm_inference_timesteps(num_steps, num_ddim_timesteps, schedule.num_train_timesteps)


def consistency_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings (c_skip, c_out) at model timestep t: c_skip(0) = 1, c_out(0) = 0
    (Song et al. 2023, sec. 3; LCM's discrete form with timestep scaling)."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def consistency_output(x: torch.Tensor, pred: Prediction, t: torch.Tensor, timestep_scaling: float | None = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0: the consistency function built on any denoiser prediction.
    ``timestep_scaling=None`` means no boundary condition: f is the x0 prediction itself."""
    if timestep_scaling is None:
        return pred.x0
    c_skip, c_out = consistency_scalings(t, timestep_scaling)
    return _bcast(c_skip.to(x.device), x) * x + _bcast(c_out.to(x.device), x) * pred.x0


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight (LCM's w-condition, fed as ``timestep_cond``); the same
    formula as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` so exported students load there."""
    w = torch.as_tensor(w, dtype=torch.float32).flatten() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(np.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def sample_consistency(denoise: Denoise, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                       generator: torch.Generator | None = None, timestep_scaling: float | None = 10.0) -> torch.Tensor:
    """Multistep consistency sampling (LCM alg. 1): map to x0 with f, re-noise to the next timestep, repeat."""
    for i, t in enumerate(timesteps):
        denoised = consistency_output(x, denoise(x, t), t, timestep_scaling)
        if i == len(timesteps) - 1:
            return denoised
        alpha, sigma = schedule.alpha_sigma(timesteps[i + 1])
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = _bcast(alpha.to(x.device), x) * denoised + _bcast(sigma.to(x.device), x) * noise
    return x
