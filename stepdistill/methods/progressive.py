"""Progressive distillation (Salimans & Ho 2022) with guidance distillation (Meng et al. 2023).

Rounds of halving: a student that samples in N steps learns to land, in one DDIM step (flow: Euler), where
its teacher lands in two; it then becomes the teacher of the next round (N/2 steps). An optional first
stage distils classifier-free guidance into a single w-conditioned network (Meng et al., stage 1); without
it, round 0 distils the guided teacher directly. UNet students get LCM's guidance embedding
(``time_cond_proj_dim``) so ``StableDiffusionPipeline`` feeds them w itself; DiT students learn one fixed w.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from torch.optim.lr_scheduler import LambdaLR

from stepdistill.errors import ConfigError
from stepdistill.methods.adversarial import AdversarialOptions, AdversarialTerm
from stepdistill.methods.common import (FrozenPassOptions, LatentMethodBase, TeacherWeightsOption,
                                       full_student, write_validation)
from stepdistill.methods.export import STUDENT_META, replace_folder, sampling_grid_meta, write_model_card
from stepdistill.methods.latent_data import DataOptions, LatentPromptData
from stepdistill.methods.synthetic import cached_teacher_latents
from stepdistill.solvers import (ddim_step, deterministic_grid, guidance_scale_embedding, halving_pairs, sample_ddim,
                                 uniform_call_sigmas)
from stepdistill.teacher import Prediction, TeacherWrapper
from stepdistill.training.loop import LoopConfig
from stepdistill.training.deepspeed_setup import refresh_engine_master_weights
from stepdistill.training.sharding import lerp_towards, load_whole_state
from stepdistill.training.step_random import StepRandom
from stepdistill.training.timing import timed


@dataclass
class ProgressiveConfig(DataOptions, FrozenPassOptions, TeacherWeightsOption, AdversarialOptions, LoopConfig):
    """Progressive distillation options; shared-loop options (learning rate, checkpoints, ...) as in LoopConfig."""

    pretrained_teacher_model: str = "tiny-sd"  # shipped teacher name or diffusers pipeline folder
    start_steps: int = 64  # the teacher's step count in round 0
    end_steps: int = 4  # the final student's step count (start_steps / end_steps must be a power of two)
    iterations_per_round: int = 1000  # optimizer steps per halving round
    guidance_distillation_steps: int = 0  # Meng et al. stage 1 before the rounds (0: distil the guided teacher in round 0)
    w_min: float = 3.0  # guidance weight range sampled per example; the teacher's CFG scale is w + 1
    w_max: float = 3.0  # DiT students have no w input, so they need w_min == w_max
    time_cond_proj_dim: int = 256  # UNet students: size of the guidance (w) embedding
    target: Literal["auto", "x", "eps", "v"] = "auto"  # regression space (Salimans & Ho, sec. 4); auto: the network's own output
    loss_weighting: Literal["none", "truncated_snr", "snr_plus_one"] = "none"  # extra SNR weight on that error
    ema_decay: float = 0.99  # EMA of the student; the EMA is exported and becomes the next round's teacher (0: off)
    lr_per_round: bool = False  # restart the warm-up and decay the rate linearly to 0 within every phase (replaces lr_scheduler)
    train_latents: Literal["dataset", "teacher"] = "dataset"  # the x0 that training noises: the dataset's latents, or the teacher's own guided samples of its captions (made once, cached in output_dir)
    synthetic_steps: int = 25  # train_latents=teacher: DDIM steps per teacher sample (CFG scale w_min + 1)
    adversarial_weight: float = 0.0  # > 0: add LADD's discriminator loss on the student's x0 in the halving rounds (real side: the dataset; gan_loss, disc_* options)
    gradient_checkpointing: bool = False  # trade compute for memory on big teachers
    enable_xformers_memory_efficient_attention: bool = False  # GPU only
    max_sequence_length: int = 8  # T5 tokens per prompt of SD3 / PixArt / Flux teachers (their pipelines: 256 / 300 / 512; the testbed DiT: 8 zero tokens)
    validation_prompts: list[str] = field(default_factory=lambda: ["hamster face", "red apple", "rocket", "sun"])
    max_train_steps: int = 0  # 0: guidance_distillation_steps + rounds x iterations_per_round (other values refused)

    def validate(self) -> None:
        self.validate_data()
        self.validate_adversarial()
        if self.adversarial_weight < 0:
            raise ConfigError(f"adversarial_weight={self.adversarial_weight} must be 0 (off) or positive")
        if self.start_steps < 2 or self.end_steps < 1 or self.start_steps % self.end_steps:
            raise ConfigError(f"start_steps={self.start_steps}, end_steps={self.end_steps}: need start_steps >= 2 and "
                              "a multiple of end_steps")
        ratio = self.start_steps // self.end_steps
        if ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(f"start_steps / end_steps = {self.start_steps / self.end_steps:g}; allowed: a power of two >= 2")
        if self.iterations_per_round < 1 or self.guidance_distillation_steps < 0:
            raise ConfigError(f"iterations_per_round={self.iterations_per_round}, guidance_distillation_steps="
                              f"{self.guidance_distillation_steps}: need >= 1 and >= 0")
        if self.w_min > self.w_max or self.w_min < 0:
            raise ConfigError(f"w_min={self.w_min}, w_max={self.w_max}: need 0 <= w_min <= w_max")
        shortest = min(self.iterations_per_round, self.guidance_distillation_steps or self.iterations_per_round)
        if self.lr_per_round and self.lr_warmup_steps >= shortest:
            raise ConfigError(f"lr_warmup_steps={self.lr_warmup_steps} with lr_per_round needs to be shorter than every "
                              f"phase (the shortest has {shortest} steps)")
        if self.synthetic_steps < 1:
            raise ConfigError(f"synthetic_steps={self.synthetic_steps} must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} is out of range; allowed 0 <= ema_decay < 1")
        total = self.guidance_distillation_steps + self.num_rounds * self.iterations_per_round
        if self.max_train_steps not in (0, total):
            raise ConfigError(f"max_train_steps={self.max_train_steps} does not match the rounds ({total} steps); "
                              "leave it 0 or change iterations_per_round")
        self.max_train_steps = total

    @property
    def num_rounds(self) -> int:
        return int(math.log2(self.start_steps // self.end_steps))


# Regressing in the space the network itself predicts keeps the loss well conditioned: an eps network's x0
# at low SNR is (x - sigma eps) / alpha, so an x-space loss would amplify its errors by 1/alpha (15x at t=999).
AUTO_TARGET = {"epsilon": "eps", "v_prediction": "v", "flow": "v", "sample": "x"}


@dataclass(frozen=True)
class Phase:
    """One stage of the schedule: guidance distillation, or halving round ``index`` (``student_steps`` = N)."""

    kind: Literal["guidance", "halving"]
    index: int
    student_steps: int
    first_step: int  # global optimizer step where the phase starts
    end_step: int  # global step where it ends (exclusive)

    @property
    def folder(self) -> str:
        return "guidance-distilled" if self.kind == "guidance" else f"round-{self.index}-{self.student_steps}steps"


def plan_phases(cfg: ProgressiveConfig) -> list[Phase]:
    """The whole run as consecutive phases, so any global step (a resume point too) maps to its phase."""
    phases, step = [], 0
    if cfg.guidance_distillation_steps:
        phases.append(Phase("guidance", 0, cfg.start_steps, 0, cfg.guidance_distillation_steps))
        step = cfg.guidance_distillation_steps
    for r in range(cfg.num_rounds):
        phases.append(Phase("halving", r, cfg.start_steps // 2 ** (r + 1), step, step + cfg.iterations_per_round))
        step += cfg.iterations_per_round
    return phases


def x0_from_two_steps(x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      teacher: TeacherWrapper) -> torch.Tensor:
    """The x0 whose single DDIM step t -> t_next lands on x_next (Salimans & Ho, alg. 2, x~ target).

    From x_next = a_n x0 + s_n (x_t - a_t x0) / s_t: x0 = (x_next - (s_n/s_t) x_t) / (a_n - (s_n/s_t) a_t).
    """
    a_t, s_t = (v.to(x_t).view(-1, 1, 1, 1) for v in teacher.schedule.alpha_sigma(t))
    a_n, s_n = (v.to(x_t).view(-1, 1, 1, 1) for v in teacher.schedule.alpha_sigma(t_next))
    ratio = s_n / s_t
    return (x_next - ratio * x_t) / (a_n - ratio * a_t)


def weighted_x0_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     target: str, weighting: str) -> torch.Tensor:
    """Squared error in the chosen target space, times an SNR weight, from the x0 error alone.

    For a fixed x_t the eps and v errors are the x0 error scaled by alpha/sigma and 1/sigma (vp and flow
    alike), so eps = SNR-weighted x loss and v = (SNR+1)-weighted x loss (Salimans & Ho, sec. 4).
    """
    snr = (alpha / sigma) ** 2
    space = {"x": torch.ones_like(snr), "eps": snr, "v": 1 / sigma ** 2}[target]
    extra = {"none": torch.ones_like(snr), "truncated_snr": snr.clamp_min(1.0), "snr_plus_one": snr + 1}[weighting]
    per_sample = ((x0_pred.float() - x0_target.float()) ** 2).flatten(1).mean(1)
    return (space * extra * per_sample).mean()


class ProgressiveMethod(LatentMethodBase):
    """The progressive-distillation loss, round bookkeeping and per-round exports for the shared loop."""

    name = "progressive"
    export_name = "pipeline"

    def __init__(self, cfg: ProgressiveConfig, teacher: TeacherWrapper, data: LatentPromptData):
        self.cfg, self.teacher, self.data = cfg, teacher, data
        if teacher.is_dit and cfg.w_min != cfg.w_max:
            raise ConfigError(f"w_min={cfg.w_min} != w_max={cfg.w_max}: DiT students have no guidance input; give one w")
        self.phases = plan_phases(cfg)
        self.grids = {p.student_steps: halving_pairs(p.student_steps, teacher.schedule) for p in self.phases}  # built once
        self.target = cfg.target if cfg.target != "auto" else AUTO_TARGET[teacher.prediction_type]
        self.w_embedding = not teacher.is_dit
        self.student_net = full_student(teacher.model, cfg.time_cond_proj_dim if self.w_embedding else None)
        if cfg.gradient_checkpointing:
            self.student_net.enable_gradient_checkpointing()
        self.teacher_latents: torch.Tensor | None = None  # train_latents=teacher: loaded by prepare_extra
        # The current round's teacher once it is a former student, and the student's EMA (both checkpointed,
        # so a resumed round sees them).
        self.round_teacher = copy.deepcopy(self.student_net).requires_grad_(False)
        self.ema_net = copy.deepcopy(self.student_net).requires_grad_(False)
        # Optional adversarial term: heads on the frozen original teacher's features judge the student's x0
        # against the dataset's latents, so a round can aim past its teacher's sampler rather than only copy it.
        self.adversarial = AdversarialTerm(teacher, teacher.model, cfg, False, cfg.seed) if cfg.adversarial_weight > 0 else None

    export_reads_model = False  # the export ships the EMA, a whole copy (a sharded run need not gather the student)

    def prepare_extra(self, accelerator: Accelerator, out: Path) -> None:
        if self.cfg.train_latents == "teacher":
            self.teacher_latents = cached_teacher_latents(out / "teacher_latents.safetensors", self.teacher,
                                                          self.data.captions, self.cfg.synthetic_steps,
                                                          self.cfg.w_min + 1, self.cfg.seed, accelerator, False)[0]
        if self.adversarial is not None:
            self.adversarial.prepare(accelerator)

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        """The dataset batch, plus the teacher's samples of the same captions when training noises those
        (the adversarial term keeps the dataset's latents as its real side)."""
        batch = super().make_batch(indices, device)
        if self.teacher_latents is not None:
            batch["train_latents"] = self.teacher_latents[indices].to(device)
        return batch

    def make_lr_scheduler(self, optimizer: torch.optim.Optimizer, calls_per_step: int) -> LambdaLR | None:
        """With ``lr_per_round``: warm-up, then a linear decay to 0, inside every phase. A constant rate leaves
        each round's student wherever the last noisy updates put it; decaying lets it settle before it becomes
        the next round's teacher. The shared loop steps the scheduler ``calls_per_step`` times per step."""
        if not self.cfg.lr_per_round:
            return None
        warmup = self.cfg.lr_warmup_steps

        def factor(scheduler_step: int) -> float:
            step = scheduler_step // calls_per_step
            phase = self.phase_at(step)
            local, length = step - phase.first_step, phase.end_step - phase.first_step
            if local < warmup:
                return local / warmup
            return max(0.0, (length - local) / max(1, length - warmup))

        return LambdaLR(optimizer, factor)

    # --- schedule ----------------------------------------------------------------------------------------
    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step ``step`` (0-based) belongs to."""
        return next((p for p in self.phases if p.first_step <= step < p.end_step), self.phases[-1])

    def _teacher_is_original(self, phase: Phase) -> bool:
        return phase.kind == "guidance" or (phase.index == 0 and not self.cfg.guidance_distillation_steps)

    # --- shared-loop interface -------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any], rand: StepRandom):
        phase = self.phase_at(rand.step)
        x0, embeds = batch.get("train_latents", batch["latents"]), batch["embeds"]
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * rand.rand()
        if phase.kind == "guidance":
            t = rand.randint(0, self.teacher.schedule.num_train_timesteps).to(x0.device)
            t = t + 1 if self.teacher.schedule.kind == "flow" else t  # flow timesteps run 1..T
            x_t = self._noised(x0, t, rand)
            with torch.no_grad(), timed("teacher"):
                x0_target = self._teacher_predict(phase, x_t, t, embeds, w).x0
        else:
            student_grid, teacher_grid = (g.to(x0.device) for g in self.grids[phase.student_steps])
            i = rand.randint(0, phase.student_steps).to(x0.device)
            t, t_mid, t_next = student_grid[i], teacher_grid[2 * i + 1], student_grid[i + 1]
            x_t = self._noised(x0, t, rand)
            with torch.no_grad(), timed("teacher"):
                x_mid = self._teacher_step(phase, x_t, t, t_mid, embeds, w)
                x_next = self._teacher_step(phase, x_mid, t_mid, t_next, embeds, w)
                x0_target = x0_from_two_steps(x_t, x_next, t, t_next, self.teacher)
        pred = self.teacher.with_model(model).predict(x_t, t, embeds, **self._w_kwargs(w))
        alpha, sigma = (v.to(x0.device) for v in self.teacher.schedule.alpha_sigma(t))
        loss = weighted_x0_loss(pred.x0, x0_target, alpha, sigma, self.target, self.cfg.loss_weighting)
        logs = {"round": float(phase.index if phase.kind == "halving" else -1)}
        if self.adversarial is not None and phase.kind == "halving":
            g_loss, adversarial_logs = self.adversarial.student_term(batch["latents"], pred.x0, embeds, rand)
            logs.update(adversarial_logs, distill_loss=loss.detach())
            loss = loss + self.cfg.adversarial_weight * g_loss
        return loss, logs

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, rand: StepRandom) -> torch.Tensor:
        alpha, sigma = (v.to(x0).view(-1, 1, 1, 1) for v in self.teacher.schedule.alpha_sigma(t))
        return alpha * x0 + sigma * rand.randn(*x0.shape[1:])

    def _w_kwargs(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"timestep_cond": guidance_scale_embedding(w, self.cfg.time_cond_proj_dim).to(w.device)} if self.w_embedding else {}

    def _teacher_predict(self, phase: Phase, x: torch.Tensor, t: torch.Tensor, embeds, w: torch.Tensor) -> Prediction:
        """Round 0 (or the guidance stage) asks the original guided teacher; later rounds the former student."""
        with self.cfg.frozen_autocast(x.device):
            if self._teacher_is_original(phase):
                return self.teacher.predict(x, t, embeds, guidance_scale=w + 1)
            return self.teacher.with_model(self.round_teacher).predict(x, t, embeds, **self._w_kwargs(w))

    def _teacher_step(self, phase: Phase, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, embeds, w) -> torch.Tensor:
        alpha_next, sigma_next = (v.to(x.device) for v in self.teacher.schedule.alpha_sigma(t_next))
        return ddim_step(self._teacher_predict(phase, x, t, embeds, w), alpha_next, sigma_next)

    @torch.no_grad()
    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        lerp_towards(list(self.ema_net.parameters()), model.parameters(), 1 - self.cfg.ema_decay)

    @torch.no_grad()
    def on_step_end(self, model: torch.nn.Module, done: int, out_dir: Path, accelerator: Accelerator) -> None:
        """At the end of a phase the EMA student becomes the next round's teacher (and the student restarts
        from it), and its pipeline folder is written."""
        phase = self.phase_at(done - 1)
        if done != phase.end_step:
            return
        self.round_teacher.load_state_dict(self.ema_net.state_dict())
        load_whole_state(accelerator.unwrap_model(model), self.ema_net.state_dict())
        refresh_engine_master_weights(model)
        if accelerator.is_main_process:
            replace_folder(out_dir / "rounds" / phase.folder, lambda tmp: self._export_pipeline(self.ema_net, tmp, phase.student_steps))

    def checkpoint_objects(self) -> list[Any]:
        return [self.round_teacher, self.ema_net, *(self.adversarial.checkpoint_objects() if self.adversarial else [])]

    # --- sampling, validation, export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: torch.nn.Module, prompts: list[str], steps: int, noise: torch.Tensor,
               guidance_scale: float | None = None) -> torch.Tensor:
        """Deterministic DDIM / Euler sampling of the student on its training grid; latents out."""
        student = self.teacher.with_model(model)
        embeds = student.encode_prompts(prompts)
        w = torch.full((len(prompts),), self.cfg.w_min if guidance_scale is None else guidance_scale - 1)
        extra = self._w_kwargs(w)
        grid = deterministic_grid(self.teacher.schedule, steps)
        was_training = model.training
        model.eval()
        out = sample_ddim(lambda x, t: student.predict(x, t, embeds, **extra), noise, grid, self.teacher.schedule)
        model.train(was_training)
        return out

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        from stepdistill.sampling import decode, initial_noise

        prompts = self.cfg.validation_prompts
        noise = initial_noise(self.teacher, len(prompts), seed=0)
        steps = sorted({self.phase_at(step - 1).student_steps, self.cfg.end_steps})
        images = {k: decode(self.teacher, self.sample(self.ema_net, prompts, k, noise)) for k in steps}
        write_validation(images, step, out_dir, accelerator)

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        self._export_pipeline(self.ema_net, out_dir, self.phases[-1].student_steps)

    def _export_pipeline(self, net: torch.nn.Module, out_dir: Path, steps: int) -> None:
        """A pipeline folder of the teacher's class that samples on the training grid (trailing DDIM / flow Euler
        with the student's ``sigmas=``)."""
        pipe = copy.copy(self.teacher.pipe)
        modules = {self.teacher.denoiser_name: copy.deepcopy(net).to(torch.float32)}
        if self.teacher.schedule.kind != "flow":  # flow students keep the teacher's Euler scheduler
            modules["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        pipe.register_modules(**modules)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        # The w-conditioned UNet reads w = guidance_scale - 1 from the pipeline; DiT students must run without CFG.
        guidance = self.cfg.w_min + 1 if self.w_embedding else 1.0
        grid_meta = sampling_grid_meta(self.teacher)  # flow: halving_pairs' nested grid, passed as sigmas=
        meta = {"method": "progressive", "num_inference_steps": steps, "guidance_scale": guidance, **grid_meta}
        (out_dir / STUDENT_META).write_text(json.dumps(meta, indent=2))
        sigmas = uniform_call_sigmas(steps) if grid_meta else None
        write_model_card(out_dir, self.cfg, self.teacher, lora=False, steps=steps, guidance_scale=guidance,
                         call_sigmas=sigmas)
