"""Latent consistency distillation (Luo et al. 2023), full model or LoRA, for UNet and DiT teachers.

Per step: noise a latent to t_{n+k} on the skipping grid, let the guided teacher take one DDIM step
(flow: Euler) to t_n, and pull the student's consistency output at t_{n+k} towards the target network's
output at t_n (LCM eq. 8-9). In LoRA mode the teacher is the same network with its adapter disabled.
"""
from __future__ import annotations

import copy
import json
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from diffusers import FlowMatchLCMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from stepdistill.errors import ConfigError
from stepdistill.methods.adversarial import AdversarialOptions, AdversarialTerm
from stepdistill.methods.common import (FrozenPassOptions, LatentMethodBase, TeacherWeightsOption,
                                       build_student, write_validation)
from stepdistill.methods.export import (FLOW_LCM_SCHEDULER, FLOW_LCM_SCHEDULER_KWARGS, STUDENT_META, flow_lcm_grid_meta,
                                       scheduler_setup, write_lora, write_model_card)
from stepdistill.methods.folded_lora import BaseTwin, FoldedLora, LoraForwardOption, folded_runner
from stepdistill.methods.latent_data import DataOptions, LatentPromptData
from stepdistill.methods.target_adapter import AdapterEMA
from stepdistill.solvers import (consistency_output, ddim_step, guidance_scale_embedding, lcm_call_sigmas,
                                 lcm_skip_timesteps, lcm_student_timesteps, sample_consistency)
from stepdistill.teacher import PromptEmbeds, TeacherWrapper
from stepdistill.training.loop import LoopConfig
from stepdistill.training.side_thread import SideThread, side_thread_wanted
from stepdistill.training.sharding import LORA_UNSHARDED, lerp_towards
from stepdistill.training.step_random import StepRandom
from stepdistill.training.timing import timed


@dataclass
class LCMConfig(DataOptions, LoraForwardOption, FrozenPassOptions, TeacherWeightsOption, AdversarialOptions, LoopConfig):
    """LCM / LCM-LoRA options; names follow diffusers' LCM distillation examples where they mean the same."""

    pretrained_teacher_model: str = "tiny-sd"  # shipped teacher name or diffusers pipeline folder
    use_lora: bool = True  # LCM-LoRA (True) or full-model LCM with a guidance embedding (False)
    lora_rank: int = 16  # LoRA rank
    lora_alpha: float = 16.0  # LoRA alpha (scale = alpha / rank)
    num_ddim_timesteps: int = 50  # N of the skipping grid, k = T / N
    w_min: float = 3.0  # guidance weight range sampled per example; teacher CFG scale is w + 1
    w_max: float = 3.0  # (LoRA students cannot see w, so keep the range narrow there)
    time_cond_proj_dim: int = 256  # full UNet mode: size of the guidance (w) embedding
    loss_type: Literal["l2", "huber"] = "huber"  # distance between student and target outputs
    huber_c: float = 0.001  # pseudo-Huber c
    snr_gamma: float | None = None  # Min-SNR-gamma weight min(SNR(t), gamma) on each sample's distance (none: uniform, as LCM)
    timestep_scaling_factor: float = 10.0  # boundary-condition timestep scaling (LCMScheduler's timestep_scaling)
    ema_decay: float = 0.95  # target network EMA decay (full mode, or LoRA with use_target_network)
    use_target_network: bool = False  # LoRA mode: EMA target copy of the adapter instead of the student itself
    adversarial_weight: float = 0.0  # > 0: add LADD's discriminator loss on the student's x0 estimates (gan_loss, disc_* options)
    gradient_checkpointing: bool = False  # trade compute for memory on big teachers
    enable_xformers_memory_efficient_attention: bool = False  # GPU only
    overlap_teacher: bool | None = None  # teacher (and target) passes on a second CPU thread during the student's; keeps a frozen network copy as diffusers' script does (none: on for CPU runs with 2+ threads)
    max_sequence_length: int = 8  # T5 tokens per prompt of SD3 / PixArt / Flux teachers (their pipelines: 256 / 300 / 512; the testbed DiT: 8 zero tokens)
    validation_prompts: list[str] = field(default_factory=lambda: ["hamster face", "red apple", "rocket", "sun"])

    def validate(self) -> None:
        self.validate_data()
        self.validate_adversarial()
        if self.adversarial_weight < 0:
            raise ConfigError(f"adversarial_weight={self.adversarial_weight} must be 0 (off) or positive")
        if self.w_min > self.w_max or self.w_min < 0:
            raise ConfigError(f"w_min={self.w_min}, w_max={self.w_max}: need 0 <= w_min <= w_max")
        if self.use_lora and self.lora_rank < 1:
            raise ConfigError(f"lora_rank={self.lora_rank} must be at least 1")
        self.validate_lora_forward()
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"snr_gamma={self.snr_gamma} must be positive (or none for uniform weighting)")
        if not 1 <= self.num_ddim_timesteps <= 1000:
            raise ConfigError(f"num_ddim_timesteps={self.num_ddim_timesteps} is out of range; allowed 1..1000")


@dataclass
class _TeacherJob:
    """One step's draws and its (possibly still running) teacher solver step."""

    step: int
    t: torch.Tensor
    t_prev: torch.Tensor
    w: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor
    x_prev: Future


def consistency_grid(teacher: TeacherWrapper, num_ddim_timesteps: int) -> torch.Tensor:
    """Ascending training grid: LCM's k-1, ..., T-1 for vp teachers; k, ..., T for flow (so T is pure noise)."""
    grid = lcm_skip_timesteps(num_ddim_timesteps, teacher.schedule.num_train_timesteps)
    return grid + 1 if teacher.schedule.kind == "flow" else grid


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(|a - b|^2 + c^2) - c per sample (Song & Dhariwal 2023), shape (B,)."""
    return (((a.float() - b.float()) ** 2).flatten(1).sum(1) + c ** 2).sqrt().sub(c)


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) (Hang et al. 2023) for an x0-space loss: an eps network's x0 at high noise is
    (x - sigma eps) / alpha, so uniform weights let the 1/alpha-amplified high-noise terms dominate."""
    return ((alpha / sigma) ** 2).clamp_max(gamma)


class LCMMethod(LatentMethodBase):
    """The LCM loss and export for the shared loop."""

    name = "lcm"

    def __init__(self, cfg: LCMConfig, teacher: TeacherWrapper, data: LatentPromptData):
        self.cfg, self.teacher, self.data = cfg, teacher, data
        self.export_name = "lora" if cfg.use_lora else "pipeline"
        self.grid = consistency_grid(teacher, cfg.num_ddim_timesteps)
        self.k = teacher.schedule.num_train_timesteps // cfg.num_ddim_timesteps
        base = teacher.model
        self.w_embedding = not cfg.use_lora and not teacher.is_dit
        self.student_net = build_student(teacher, cfg, cfg.time_cond_proj_dim if self.w_embedding else None)
        self.overlap = side_thread_wanted(cfg.overlap_teacher, cfg.num_threads)
        self.side: SideThread | None = None  # started by the loop (start_training), stopped by close()
        self.side_net = None  # LoRA + side thread: a frozen copy (base + adapter) that only the side thread runs
        if self.overlap and cfg.use_lora:
            self.side_net = copy.deepcopy(self.student_net).requires_grad_(False)
        self._next: _TeacherJob | None = None  # the next step's teacher pass, started during this step's backward
        self.target_net = None  # full mode: an EMA copy of the student
        self.target_adapter = None  # LoRA mode: an EMA copy of the adapter only (in side_net when there is one)
        if not cfg.use_lora:
            self.target_net = copy.deepcopy(self.student_net).requires_grad_(False)
        elif cfg.use_target_network:
            self.target_adapter = AdapterEMA(self.student_net, cfg.ema_decay, holder=self.side_net)
        self.adversarial = AdversarialTerm(teacher, base, cfg, cfg.use_lora, cfg.seed) if cfg.adversarial_weight > 0 else None
        # LoRA: the teacher passes run the base twin of the network they use (no peft layers: less Python, which
        # on the side thread holds the GIL that the student's pass waits for)
        self.teacher_base = BaseTwin(self.side_net if self.side_net is not None else self.student_net) if cfg.use_lora else None
        self.folded: dict[int, FoldedLora] = {}  # lora_forward=folded: each network's folded runner, by id
        # the student's adapter tensors by name, looked up once: the side's folded target reads them every step
        self._live_adapter = [(name, p) for name, p in self.student_net.named_parameters() if p.requires_grad]
        if cfg.lora_forward == "folded" and cfg.use_lora:
            for net in (self.student_net, self.side_net):
                if net is not None:
                    folded_runner(self.folded, net)

    @property
    def export_reads_model(self) -> bool:
        """The loop's export hands over the trained module only for LoRA; a full student ships its target
        network (so a sharded run need not gather the student for it)."""
        return self.cfg.use_lora

    def sharding_refusal(self) -> str | None:
        """Why these settings cannot run under FSDP, or None: a LoRA student is the teacher's network with an
        adapter, whose teacher and target passes run outside the sharded forward."""
        return LORA_UNSHARDED if self.cfg.use_lora else None

    def prepare_extra(self, accelerator: Accelerator, out: Path) -> None:
        if self.adversarial is not None:
            self.adversarial.prepare(accelerator)

    # --- shared-loop interface -------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any], rand: StepRandom):
        x0, embeds = batch["latents"], batch["embeds"]
        if self.side is None:
            t, noise, w = self._draws(x0, rand)
            loss, prediction = self.consistency_loss(model, x0, embeds, t, noise, w)
        else:
            loss, prediction = self._overlapped_loss(model, batch, rand)
        logs = {}
        if self.adversarial is not None:  # the consistency output is the student's x0 estimate: judge it like LADD
            g_loss, logs = self.adversarial.student_term(x0, prediction, embeds, rand)
            logs["consistency_loss"] = loss.detach()
            loss = loss + self.cfg.adversarial_weight * g_loss
        return loss, logs

    def prefetch(self, batch: dict[str, Any], rand: StepRandom) -> None:
        """Loop hook with the next step's inputs, called before this step's backward: with a side thread, the
        next teacher pass (frozen, so independent of this update) runs during the backward."""
        if self.side is not None:
            self._next = self._start_teacher(batch, rand)

    def start_training(self) -> None:
        """Loop hook before the first step: start the side thread. Only the loop overlaps passes; direct calls
        of compute_loss (probes, tests) stay sequential and leave the process's thread settings alone."""
        if self.overlap and self.side is None:
            self.side = SideThread(self.cfg.num_threads or None)

    def close(self) -> None:
        """Loop hook at the end of training (also after an error): stop the side thread."""
        if self.side is not None:
            self.side.close()
            self.side, self._next = None, None

    def _draws(self, x0: torch.Tensor, rand: StepRandom) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step's random grid timesteps, noise and guidance weights, always drawn in this order."""
        t = self.grid.to(x0.device)[rand.randint(0, len(self.grid))]
        noise = rand.randn(*x0.shape[1:])
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * rand.rand()
        return t, noise, w

    def consistency_loss(self, model: torch.nn.Module, x0: torch.Tensor, embeds: PromptEmbeds, t: torch.Tensor,
                         noise: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LCM's objective for given draws (also used to evaluate it on a fixed batch); returns (loss, student x0)."""
        alpha, sigma, x_t, t_prev = self._noised(x0, t, noise)
        extra = self._w_kwargs(w)
        prediction = self._student_output(model, x_t, t, embeds, extra)
        with torch.no_grad(), timed("teacher"):
            target = self._target_output(self._teacher_solver_step(x_t, t, t_prev, embeds, w), t_prev, embeds, extra)
        return self.distance(prediction, target, alpha, sigma), prediction

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """(alpha_t, sigma_t, x_t, t_prev): the noised latent and the grid point one skip below t."""
        alpha, sigma = self.teacher.schedule.alpha_sigma(t)
        x_t = alpha.view(-1, 1, 1, 1).to(x0) * x0 + sigma.view(-1, 1, 1, 1).to(x0) * noise
        return alpha, sigma, x_t, (t - self.k).clamp_min(0)

    def _student_output(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                        extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's consistency output (its x0 estimate) at t."""
        if self.folded:
            model = folded_runner(self.folded, model)
        raw = self.teacher.with_model(model).predict(x_t, t, embeds, **extra)
        return consistency_output(x_t, raw, t, self.cfg.timestep_scaling_factor)

    def _start_teacher(self, batch: dict[str, Any], rand: StepRandom) -> _TeacherJob:
        """Draw a step's randomness (main thread, fixed order) and queue its teacher solver step on the side thread."""
        x0, embeds = batch["latents"], batch["embeds"]
        t, noise, w = self._draws(x0, rand)
        alpha, sigma, x_t, t_prev = self._noised(x0, t, noise)
        x_prev = self.side.submit(self._teacher_solver_step, x_t, t, t_prev, embeds, w)
        return _TeacherJob(rand.step, t, t_prev, w, alpha, sigma, x_t, x_prev)

    def _overlapped_loss(self, model: torch.nn.Module, batch: dict[str, Any], rand: StepRandom):
        """The same loss as :meth:`consistency_loss`; the target pass runs on the side thread during the student's."""
        job = self._next if self._next is not None and self._next.step == rand.step else self._start_teacher(batch, rand)
        self._next = None
        embeds, extra = batch["embeds"], self._w_kwargs(job.w)
        net = self.target_model()  # chosen here: a folded target reads the live adapter's tensors on this thread
        target = self.side.submit(lambda: self._target_output(job.x_prev.result(), job.t_prev, embeds, extra, net))
        prediction = self._student_output(model, job.x_t, job.t, embeds, extra)
        with timed("teacher"):  # here: the time spent waiting for the side thread
            target = target.result()
        return self.distance(prediction, target, job.alpha, job.sigma), prediction

    @torch.no_grad()
    def fixed_batch_objective(self, model: torch.nn.Module, x0: torch.Tensor, embeds: PromptEmbeds, noise: torch.Tensor,
                              timesteps: torch.Tensor) -> float:
        """The objective averaged over ``timesteps`` on one fixed batch at w = w_min, with the current target:
        a training curve without the noise of random batches, timesteps and draws."""
        w = torch.full((x0.shape[0],), self.cfg.w_min, device=x0.device)
        losses = [self.consistency_loss(model, x0, embeds, t.expand(x0.shape[0]).to(x0.device), noise, w)[0] for t in timesteps]
        return torch.stack(losses).mean().item()

    def distance(self, prediction: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The configured distance per sample (l2: mean square, huber: pseudo-Huber), weighted, batch mean."""
        if self.cfg.loss_type == "l2":
            per_sample = ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)
        else:
            per_sample = pseudo_huber(prediction, target, self.cfg.huber_c)
        if self.cfg.snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(alpha.to(per_sample), sigma.to(per_sample), self.cfg.snr_gamma)
        return per_sample.mean()

    def _w_kwargs(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"timestep_cond": guidance_scale_embedding(w, self.cfg.time_cond_proj_dim).to(w.device)} if self.w_embedding else {}

    def _teacher_solver_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, embeds: PromptEmbeds,
                             w: torch.Tensor) -> torch.Tensor:
        """One guided teacher DDIM (flow: Euler) step from t to t_prev; the teacher is the frozen network, or
        the LoRA network's base twin (the network without its adapter layers)."""
        net = self.teacher_base() if self.teacher_base is not None else self.teacher.model
        with self.cfg.frozen_autocast(x_t.device):
            # on the side thread the two guidance passes run one after the other: as fast there, less memory at once
            teacher_pred = self.teacher.with_model(net).predict(x_t, t, embeds, guidance_scale=w + 1,
                                                                batched_guidance=self.side is None)
        return ddim_step(teacher_pred, *[v.to(x_t.device) for v in self.teacher.schedule.alpha_sigma(t_prev)])

    def _target_output(self, x_prev: torch.Tensor, t_prev: torch.Tensor, embeds: PromptEmbeds,
                       extra: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        """The target network's (``net``, by default :meth:`target_model`'s) consistency output at t_prev."""
        with self.cfg.frozen_autocast(x_prev.device):
            target_pred = self.teacher.with_model(net if net is not None else self.target_model()).predict(x_prev, t_prev, embeds, **extra)
        return consistency_output(x_prev, target_pred, t_prev, self.cfg.timestep_scaling_factor)

    def target_model(self) -> torch.nn.Module:
        """The network LCM's targets come from: the EMA copy, the student run with the EMA adapter, or the student."""
        if self.target_net is not None:
            return self.target_net
        if self.folded:
            return self._folded_target()
        return self.target_adapter.module() if self.target_adapter is not None else self.teacher.model

    def _folded_target(self) -> FoldedLora:
        """lora_forward=folded: the target network folded. With a side thread it is the side copy, whose runner
        the side thread alone uses (a folded call swaps tensors into its runner's network for the call): folded
        with its own adapter (the EMA, when it holds one) or with the student's live tensors (read here, on the
        main thread)."""
        if self.side_net is not None:
            side = self.folded[id(self.side_net)]
            if self.target_adapter is not None:
                return side
            return side.using({name: p.detach() for name, p in self._live_adapter})
        student = self.folded[id(self.student_net)]
        return student.using(self.target_adapter.shadow) if self.target_adapter is not None else student

    @torch.no_grad()
    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        if self.target_adapter is not None:
            self.target_adapter.update()
        if self.target_net is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            targets = [p for p, q in zip(self.target_net.parameters(), model.parameters()) if q.requires_grad]
            lerp_towards(targets, trainable, 1 - self.cfg.ema_decay)

    def checkpoint_objects(self) -> list[Any]:
        own = [obj for obj in (self.target_net, self.target_adapter) if obj is not None]
        return own + (self.adversarial.checkpoint_objects() if self.adversarial is not None else [])

    # --- sampling, validation, export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: torch.nn.Module, prompts: list[str], steps: int, noise: torch.Tensor,
               guidance_scale: float | None = None, seed: int = 0) -> torch.Tensor:
        """Multistep consistency sampling of the student; latents out."""
        student = self.teacher.with_model(model)
        embeds = student.encode_prompts(prompts)
        w = torch.full((len(prompts),), self.cfg.w_min if guidance_scale is None else guidance_scale - 1)
        extra = self._w_kwargs(w)
        timesteps = lcm_student_timesteps(self.teacher.schedule, steps, self.cfg.num_ddim_timesteps)
        was_training = model.training
        model.eval()
        out = sample_consistency(lambda x, t: student.predict(x, t, embeds, **extra), noise, timesteps, self.teacher.schedule,
                                 torch.Generator().manual_seed(seed), self.cfg.timestep_scaling_factor)
        model.train(was_training)
        return out

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        from stepdistill.sampling import decode, initial_noise

        prompts = self.cfg.validation_prompts
        noise = initial_noise(self.teacher, len(prompts), seed=0)
        grids = {k: decode(self.teacher, self.sample(model, prompts, k, noise)) for k in (1, 2, 4, 8)}
        write_validation(grids, step, out_dir, accelerator)

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        flow = self.teacher.schedule.kind == "flow"
        if self.cfg.use_lora:
            write_lora(model, self.teacher, out_dir, scheduler=FLOW_LCM_SCHEDULER if flow else "LCMScheduler",
                       scheduler_kwargs=FLOW_LCM_SCHEDULER_KWARGS if flow else None,
                       extra_meta=flow_lcm_grid_meta(self.cfg.num_ddim_timesteps) if flow else None)
        else:
            self._export_pipeline(self.target_net, out_dir)
        write_model_card(out_dir, self.cfg, self.teacher, lora=self.cfg.use_lora,
                         guidance_scale=None if self.cfg.use_lora else self._export_guidance(),
                         scheduler_setup=scheduler_setup(FLOW_LCM_SCHEDULER, FLOW_LCM_SCHEDULER_KWARGS) if flow else None,
                         call_sigmas=lcm_call_sigmas(4, self.cfg.num_ddim_timesteps) if flow else None)

    def _export_guidance(self) -> float:
        """A full student's pipeline guidance scale: a w-embedding UNet reads w = guidance_scale - 1 from the
        pipeline; a DiT student has its w built in (1.0: no CFG)."""
        return self.cfg.w_min + 1 if self.w_embedding else 1.0

    def _export_pipeline(self, net: torch.nn.Module, out_dir: Path) -> None:
        """Full student as a pipeline folder with its few-step scheduler (SD UNet: LatentConsistencyModelPipeline;
        SDXL and DiTs: their own pipeline class; SDXL's feeds a w-embedding UNet its guidance itself, as the LCM
        one does). vp networks sample with LCMScheduler, flow DiTs with FlowMatchLCMScheduler on the LCM grid
        (a call passes ``sigmas=lcm_call_sigmas(N)``)."""
        pipe = self.teacher.pipe
        flow = self.teacher.schedule.kind == "flow"
        if flow:
            scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, **FLOW_LCM_SCHEDULER_KWARGS)
        else:
            scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=self.cfg.timestep_scaling_factor,
                                                 original_inference_steps=self.cfg.num_ddim_timesteps)
        if self.teacher.is_dit or self.teacher.is_sdxl:
            export = copy.copy(pipe)
            export.register_modules(**{self.teacher.denoiser_name: net}, scheduler=scheduler)
        else:
            export = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                                    unet=net, scheduler=scheduler, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
        export.save_pretrained(out_dir, safe_serialization=True)
        meta = {"method": "lcm", "guidance_scale": self._export_guidance()}
        if flow:  # the scheduler is in the folder already; the grid is what a call must pass
            meta.update(flow_lcm_grid_meta(self.cfg.num_ddim_timesteps))
        (out_dir / STUDENT_META).write_text(json.dumps(meta))

