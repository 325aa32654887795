"""Noise schedules as x_t = alpha(t) * x0 + sigma(t) * eps, for both DDPM-family and flow-matching models.

Everything downstream (solvers, losses, trainers) only asks for alpha and sigma at a model timestep, so
one DDIM-type update serves epsilon/v teachers and rectified-flow teachers alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, SchedulerMixin

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")


@dataclass
class NoiseSchedule:
    """Either a discrete variance-preserving table (``alphas_cumprod``) or rectified flow (alpha = 1 - sigma)."""

    kind: str  # "vp" or "flow"
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # vp only, float64 for exact conversions
    final_alpha_cumprod: float = 1.0  # vp: alpha_cumprod used for "timestep -1" (diffusers' set_alpha_to_one)
    shift: float = 1.0  # flow: the scheduler's timestep shift, used when building sampling grids
    uniform_sigmas: bool = False  # flow: the pipeline samples from sigmas 1, (N-1)/N, ..., 1/N (Flux), not SD3's grid
    _device_tables: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin, image_seq_len: int | None = None,
                       uniform_sigmas: bool = False) -> NoiseSchedule:
        """Read the schedule from any diffusers scheduler, reusing diffusers' own beta computations.

        Flow schedulers with ``use_dynamic_shifting`` (Flux's) are shifted by an amount that grows with the
        image's token count, ``image_seq_len``, fixed here for the latents the teacher is trained and sampled
        at; ``uniform_sigmas``: the pipeline samples from sigmas 1, (N-1)/N, ..., 1/N."""
        config = scheduler.config
        if type(scheduler).__name__ in FLOW_SCHEDULERS:
            shift = float(config.get("shift", 1.0))
            if image_seq_len is not None and config.get("use_dynamic_shifting", False):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                shift = math.exp(calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                                 config.get("max_shift", 1.15)))
            return cls("flow", config.num_train_timesteps, shift=shift, uniform_sigmas=uniform_sigmas)
        ddpm = DDPMScheduler.from_config(config)
        acp = ddpm.alphas_cumprod.double()
        final = 1.0 if config.get("set_alpha_to_one", True) else float(acp[0])
        return cls("vp", config.num_train_timesteps, acp, final)

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float32 tensors of the timesteps' shape; vp timestep -1 means clean."""
        t = torch.as_tensor(timesteps)
        if self.kind == "flow":
            sigma = t.double() / self.num_train_timesteps
            return (1 - sigma).float(), sigma.float()
        acp = self._table(t.device)[(t.long() + 1).clamp(0, self.num_train_timesteps)]
        return acp.sqrt().float(), (1 - acp).sqrt().float()

    def _table(self, device: torch.device) -> torch.Tensor:
        """[final, acp_0, ..., acp_{T-1}] on ``device``, kept there so lookups need no host round trip."""
        if device not in self._device_tables:
            head = torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)
            self._device_tables[device] = torch.cat([head, self.alphas_cumprod]).to(device)
        return self._device_tables[device]

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's own noise level: sqrt((1 - acp) / acp) for vp (Euler/Karras sigma), t/T for flow."""
        alpha, sigma = self.alpha_sigma(timesteps)
        return sigma if self.kind == "flow" else sigma / alpha

    def timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma`: continuous timesteps, log-sigma interpolation on the vp table."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if self.kind == "flow":
            return (sigmas * self.num_train_timesteps).float()
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().log()
        log_s = sigmas.clamp_min(1e-12).log()
        idx = torch.searchsorted(table, log_s).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + frac).float()
