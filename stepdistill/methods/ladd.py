"""Latent adversarial diffusion distillation (LADD, Sauer et al. 2024) for 1-4 step students.

Per step: noise a (teacher-generated or real) latent to one of the student's few timesteps, let the
student predict x0, re-noise that prediction at a logit-normal level, and score it with trainable heads
on the frozen teacher's features. The heads learn to tell data from student latents; the student
learns to fool them, optionally with a regression term towards the teacher's own (noise -> sample) pairs.
"""
from __future__ import annotations

import copy
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from accelerate import Accelerator

from stepdistill.errors import ConfigError
from stepdistill.methods.adversarial import AdversarialOptions, AdversarialTerm
from stepdistill.methods.common import (LatentMethodBase, TeacherWeightsOption, build_student,
                                       write_validation)
from stepdistill.methods.export import (STUDENT_META, read_student_meta, sampling_grid_meta, scheduler_setup, write_lora,
                                       write_model_card)
from stepdistill.methods.folded_lora import FoldedLora, LoraForwardOption, folded_runner
from stepdistill.methods.latent_data import DataOptions, LatentPromptData
from stepdistill.methods.synthetic import cached_teacher_latents
from stepdistill.methods.target_adapter import AdapterEMA
from stepdistill.schedule import NoiseSchedule
from stepdistill.solvers import (consistency_output, ddim_step, deterministic_grid, few_step_timesteps,
                                 guidance_scale_embedding, sample_consistency, sample_ddim, uniform_call_sigmas)
from stepdistill.teacher import PromptEmbeds, TeacherWrapper
from stepdistill.training.loop import LoopConfig
from stepdistill.training.sharding import LORA_UNSHARDED
from stepdistill.training.step_random import StepRandom

LCM_ORIGINAL_STEPS = 50  # LCMScheduler's default original_inference_steps: fixes the exported timesteps
STUDENT_PREDICTIONS = ("auto", "epsilon", "sample", "v_prediction")


@dataclass
class LADDConfig(DataOptions, LoraForwardOption, TeacherWeightsOption, AdversarialOptions, LoopConfig):
    """LADD options; loop, LoRA and data options are named as in the LCM trainer."""

    pretrained_teacher_model: str = "tiny-sd"  # shipped teacher name or diffusers pipeline folder
    use_lora: bool = True  # LoRA student (True) or full-model student
    init_student_from: str | None = None  # full-model student only: start from this pipeline folder's denoiser (e.g. a progressive student), not the teacher's
    student_prediction: str = "auto"  # the full student's output: auto (the init student's, else the teacher's), epsilon, sample or v_prediction (UNet teachers)
    lora_rank: int = 16  # LoRA rank
    lora_alpha: float = 16.0  # LoRA alpha
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # trained for the union of these step grids
    student_sampler: Literal["stochastic", "deterministic"] = "stochastic"  # re-noise between steps (LCM / stochastic flow) or DDIM / Euler, inputs simulated by the student
    deterministic_loss: Literal["every_step", "final"] = "every_step"  # deterministic sampler: losses on every step's x0, or on the sampler's output only with gradients through all its steps
    timestep_warmup_steps: int = 200  # student timesteps start at the noisiest only, reach uniform after this
    real_data: Literal["synthetic", "real"] = "synthetic"  # the discriminator's 'real' side: teacher samples or the dataset
    synthetic_steps: int = 25  # teacher solver steps per synthetic latent
    synthetic_guidance_scale: float = 4.0  # teacher CFG scale for synthetic latents
    adversarial_weight: float = 1.0  # weight of the generator loss
    distill_weight: float = 0.0  # weight of the regression term towards the data latent (teacher pairs at t_max)
    distill_timesteps: Literal["all", "noisiest"] = "all"  # where the regression applies; stochastic sampler: below t_max its target is a posterior mean (blur)
    ema_decay: float = 0.0  # EMA of the student's trainable weights, which validation and the export then use (0: off)
    timestep_scaling_factor: float = 10.0  # vp: LCMScheduler's boundary scaling, so the export samples identically
    gradient_checkpointing: bool = False  # trade compute for memory on big teachers
    enable_xformers_memory_efficient_attention: bool = False  # GPU only
    max_sequence_length: int = 8  # T5 tokens per prompt of SD3 / PixArt / Flux teachers (their pipelines: 256 / 300 / 512; the testbed DiT: 8 zero tokens)
    validation_prompts: list[str] = field(default_factory=lambda: ["hamster face", "red apple", "rocket", "sun"])

    def validate(self) -> None:
        self.validate_data()
        self.validate_adversarial()
        self.validate_lora_forward()
        if not self.student_steps or any(not 1 <= s <= LCM_ORIGINAL_STEPS for s in self.student_steps):
            raise ConfigError(f"student_steps={self.student_steps} must be step counts in 1..{LCM_ORIGINAL_STEPS}")
        if self.use_lora and self.lora_rank < 1:
            raise ConfigError(f"lora_rank={self.lora_rank} must be at least 1")
        if self.use_lora and self.init_student_from is not None:
            raise ConfigError(f"init_student_from={self.init_student_from!r} needs use_lora=false: a LoRA student starts from the teacher")
        if self.student_prediction not in STUDENT_PREDICTIONS:
            raise ConfigError(f"student_prediction={self.student_prediction!r} is not known; allowed: {', '.join(STUDENT_PREDICTIONS)}")
        if self.use_lora and self.student_prediction != "auto":
            raise ConfigError(f"student_prediction={self.student_prediction!r} needs use_lora=false: a LoRA student "
                              "keeps the teacher's output type, which the user's pipeline scheduler expects")
        if self.adversarial_weight < 0 or self.distill_weight < 0 or self.adversarial_weight + self.distill_weight == 0:
            raise ConfigError(f"adversarial_weight={self.adversarial_weight}, distill_weight={self.distill_weight}: "
                              "need both >= 0 and at least one > 0")
        if self.synthetic_steps < 1 or self.synthetic_guidance_scale < 0:
            raise ConfigError(f"synthetic_steps={self.synthetic_steps} must be >= 1 and "
                              f"synthetic_guidance_scale={self.synthetic_guidance_scale} >= 0")
        if self.deterministic_loss == "final" and self.student_sampler != "deterministic":
            raise ConfigError(f"deterministic_loss={self.deterministic_loss!r} needs student_sampler=deterministic "
                              f"(got {self.student_sampler!r}): only a deterministic sampler can be backpropagated through")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} is out of range; allowed 0 <= ema_decay < 1 (0: no EMA)")
        if self.timestep_warmup_steps < 0:
            raise ConfigError(f"timestep_warmup_steps={self.timestep_warmup_steps} must be 0 or more")


def student_timestep_set(teacher: TeacherWrapper, step_counts: list[int]) -> torch.Tensor:
    """Descending union of the exported scheduler's grids for each step count (e.g. 999, 759, 499, 259)."""
    grids = [few_step_timesteps(teacher.schedule, n, LCM_ORIGINAL_STEPS) for n in sorted(set(step_counts))]
    return torch.unique(torch.cat(grids)).flip(0)


def deterministic_states(schedule: NoiseSchedule, step_counts: list[int], final_only: bool = False
                         ) -> list[tuple[torch.Tensor, int]]:
    """(grid, k) for every input a deterministic student sees: step k of its N-step grid, for each N. Step 0
    (pure noise at the noisiest timestep) is the same for every N, so it is listed once, first.
    ``final_only``: just the last step of each grid, whose x0 is the sampler's output."""
    if final_only:
        return [(deterministic_grid(schedule, n), n - 1) for n in sorted(set(step_counts))]
    states = [(deterministic_grid(schedule, max(step_counts)), 0)]
    for n in sorted(set(step_counts)):
        grid = deterministic_grid(schedule, n)
        states += [(grid, k) for k in range(1, n)]
    return states


def resolve_student_prediction(cfg: LADDConfig, teacher: TeacherWrapper) -> str:
    """What the student network outputs. An epsilon UNet's x0 at the noisiest timestep is (x - sigma eps) / alpha
    with alpha(999) = 0.068 on SD schedules, so its errors reach the image 15x enlarged; a full student for
    1-2 steps can output x0 (``sample``) or v instead, and its export's scheduler says so. ``auto`` keeps
    the output type of the folder the student starts from (its scheduler config), else the teacher's."""
    if teacher.schedule.kind == "flow":
        if cfg.student_prediction != "auto":
            raise ConfigError(f"student_prediction={cfg.student_prediction!r} is for UNet (VP) teachers; "
                              "a flow teacher's student predicts the velocity: use auto")
        return teacher.prediction_type
    if cfg.student_prediction != "auto":
        return cfg.student_prediction
    if cfg.init_student_from is not None:
        config = Path(cfg.init_student_from) / "scheduler" / "scheduler_config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("prediction_type", teacher.prediction_type)
    return teacher.prediction_type


def init_student_guidance(folder: str) -> float:
    """The guidance scale a guidance-embedded student was exported for (its ``stepdistill_student.json``);
    the pipeline feeds the UNet w = guidance_scale - 1 through ``timestep_cond``, so LADD keeps that w."""
    meta = read_student_meta(folder)
    if "guidance_scale" not in meta:
        raise ConfigError(f"init_student_from={folder!r} has a guidance-embedded UNet but no {STUDENT_META} saying "
                          "its guidance_scale; give a stepdistill pipeline export")
    return float(meta["guidance_scale"])


class LADDMethod(LatentMethodBase):
    """The LADD generator/discriminator step and export for the shared loop."""

    name = "ladd"

    def __init__(self, cfg: LADDConfig, teacher: TeacherWrapper, data: LatentPromptData):
        self.cfg, self.teacher, self.data = cfg, teacher, data
        self.export_name = "lora" if cfg.use_lora else "pipeline"
        self.deterministic = cfg.student_sampler == "deterministic"
        self.timesteps = student_timestep_set(teacher, cfg.student_steps)
        self.through_sampler = self.deterministic and cfg.deterministic_loss == "final"
        self.states = (deterministic_states(teacher.schedule, cfg.student_steps, self.through_sampler)
                       if self.deterministic else None)
        # LCM's boundary scalings only where the export samples with LCMScheduler; DDIM and flow use x0 itself
        self.scaling = None if teacher.schedule.kind == "flow" or self.deterministic else cfg.timestep_scaling_factor
        base = teacher.model
        self.student_prediction = resolve_student_prediction(cfg, teacher)  # before loading: a bad value fails fast
        self.student_net = build_student(teacher, cfg, init_from=cfg.init_student_from)
        self.folded: dict[int, FoldedLora] = {}  # lora_forward=folded: the student's folded runners, by network id
        if cfg.lora_forward == "folded" and cfg.use_lora:
            folded_runner(self.folded, self.student_net)  # a layer that cannot be folded is refused here, not mid-run
        self.guidance_dim = None if teacher.is_dit else self.student_net.config.time_cond_proj_dim
        self.student_guidance = init_student_guidance(cfg.init_student_from) if self.guidance_dim else 1.0
        # w is fixed for the whole run: embed it once, not on every forward pass
        self.w_embedding = (guidance_scale_embedding(torch.tensor([self.student_guidance - 1.0]), self.guidance_dim)
                            if self.guidance_dim else None)
        self.adversarial = AdversarialTerm(teacher, base, cfg, cfg.use_lora, cfg.seed) if cfg.adversarial_weight > 0 else None
        # An adversarial student keeps moving around the discriminator's current opinion; the average of its
        # recent weights is the steadier network to ship (LoRA: only the adapter is averaged).
        self.student_ema = AdapterEMA(self.student_net, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.synthetic: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def uses_teacher_pairs(self) -> bool:
        """Student inputs and regression targets come from the teacher's (noise -> sample) pairs unless the
        run is purely adversarial against the dataset; a regression towards a dataset image from unrelated
        noise would only teach the student the mean image."""
        return self.cfg.real_data == "synthetic" or self.cfg.distill_weight > 0

    # --- shared-loop interface -------------------------------------------------------------------------
    def sharding_refusal(self) -> str | None:
        """Why these settings cannot run under FSDP, or None (a LoRA student's base is the teacher network)."""
        return LORA_UNSHARDED if self.cfg.use_lora else None

    def prepare_extra(self, accelerator: Accelerator, out: Path) -> None:
        if self.uses_teacher_pairs:
            self.synthetic = cached_teacher_latents(out / "synthetic_latents.safetensors", self.teacher, self.data.captions,
                                                    self.cfg.synthetic_steps, self.cfg.synthetic_guidance_scale,
                                                    self.cfg.seed, accelerator, self.cfg.use_lora)
        if self.adversarial is not None:
            self.adversarial.prepare(accelerator)
        if self.student_ema is not None:
            self.student_ema.rebind_live()  # FSDP2 replaced the student's parameters by sharded ones

    def make_batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        batch = super().make_batch(indices, device)
        if self.synthetic is not None:
            if self.cfg.real_data == "real":
                batch["real_latents"] = batch["latents"]
            batch["latents"] = self.synthetic[0][indices].to(device)
            batch["pair_noise"] = self.synthetic[1][indices].to(device)
        return batch

    def timestep_probabilities(self, step: int) -> torch.Tensor:
        """Warm-up of the student timestep (deterministic: input state) distribution: all mass on the
        noisiest, then uniform (LADD sec. 4)."""
        n = len(self.states) if self.deterministic else len(self.timesteps)
        mix = 1.0 if self.cfg.timestep_warmup_steps == 0 else min(step / self.cfg.timestep_warmup_steps, 1.0)
        start = torch.zeros(n)
        start[0] = 1.0
        return (1 - mix) * start + mix * torch.full((n,), 1.0 / n)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any], rand: StepRandom):
        x0, embeds = batch["latents"], batch["embeds"]
        probabilities = self.timestep_probabilities(rand.step)
        cdf = probabilities.cumsum(0)  # drawn on the host: the deterministic path reads it to pick each row's state
        host_index = torch.searchsorted(cdf, rand.rand(on_host=True) * cdf[-1], right=True).clamp_max(len(probabilities) - 1)
        index = host_index.to(x0.device)
        noise = rand.randn(*x0.shape[1:]).to(x0)
        start_noise = batch.get("pair_noise", noise)  # inference starts from pure noise at the noisiest timestep
        if self.deterministic:
            x_t, t = self.simulated_inputs(model, start_noise, embeds, host_index)
        else:
            t = self.timesteps.to(x0.device)[index]
            alpha, sigma = (v.view(-1, 1, 1, 1).to(x0) for v in self.teacher.schedule.alpha_sigma(t))
            x_t = torch.where((index == 0).view(-1, 1, 1, 1), start_noise, alpha * x0 + sigma * noise)
        fake = consistency_output(x_t, self.student(model).predict(x_t, t, embeds, **self.w_kwargs(x_t)), t,
                                  self.scaling)
        loss, logs = fake.new_zeros(()), {}
        if self.adversarial is not None:
            g_loss, logs = self.adversarial.student_term(batch.get("real_latents", x0), fake, embeds, rand)
            loss = loss + self.cfg.adversarial_weight * g_loss
        if self.cfg.distill_weight > 0:
            per_sample = (fake.float() - x0.float()).square().flatten(1).mean(1)
            if self.cfg.distill_timesteps == "noisiest":  # only there is (noise -> teacher sample) a deterministic pair
                per_sample = per_sample * (index == 0).float()
            regression = per_sample.mean()
            loss = loss + self.cfg.distill_weight * regression
            logs["distill_loss"] = regression.detach()
        return loss, logs

    def simulated_inputs(self, model: torch.nn.Module, noise: torch.Tensor, embeds: PromptEmbeds, state_index: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation for a deterministic student: each sample's input is where the student's own
        N-step DDIM / Euler sampler stands after k steps from the sample's pair noise. Training then sees
        exactly the inputs sampling will, and since that trajectory is a function of the noise alone, the
        teacher's sample from the same noise is a true regression target at every step. With
        ``deterministic_loss=final`` the steps keep their gradients, so the loss on the output trains the
        whole sampler."""
        states = [self.states[i] for i in state_index.tolist()]  # a host tensor: no wait on the accelerator
        student, x = self.student(model), noise.clone()
        with torch.set_grad_enabled(self.through_sampler and torch.is_grad_enabled()):
            x = self._run_steps(student, x, embeds, states)
        t = torch.stack([grid[k] for grid, k in states]).to(x.device)
        return x, t

    def _run_steps(self, student: TeacherWrapper, x: torch.Tensor, embeds: PromptEmbeds,
                   states: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Advance each row of ``x`` by its own number of deterministic steps along its own grid. The row
        bookkeeping is plain Python, so nothing here reads a device tensor back."""
        for j in range(max(k for _, k in states)):
            moving = [r for r, (_, k) in enumerate(states) if k > j]
            t = torch.stack([states[r][0][j] for r in moving]).to(x.device)
            t_next = torch.stack([states[r][0][j + 1] for r in moving])
            rows = torch.tensor(moving, device=x.device)
            x_rows = x[rows]  # one gather, used for the prediction and the guidance embedding's batch size
            pred = student.predict(x_rows, t, embeds.index(rows), **self.w_kwargs(x_rows))
            alpha, sigma = self.teacher.schedule.alpha_sigma(t_next)
            x = x.index_put((rows,), ddim_step(pred, alpha.to(x), sigma.to(x)).to(x.dtype))
        return x

    def student(self, model: torch.nn.Module) -> TeacherWrapper:
        """The student network behind the teacher's conversions, read as its own output type (its LoRA folded
        into the weights with lora_forward=folded)."""
        return self.teacher.with_model(folded_runner(self.folded, model) if self.folded else model, self.student_prediction)

    def w_kwargs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guidance embedding a UNet student started from a guidance-distilled one keeps getting, at its w."""
        if self.w_embedding is None:
            return {}
        return {"timestep_cond": self.w_embedding.to(x.device).expand(x.shape[0], -1)}

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        if self.student_ema is not None:
            self.student_ema.update()

    def checkpoint_objects(self) -> list[Any]:
        # heads and their optimizer are prepared by the accelerator, so they are saved already (except under FSDP)
        own = [self.student_ema] if self.student_ema is not None else []
        return own + (self.adversarial.checkpoint_objects() if self.adversarial is not None else [])

    def checkpoint_identity(self) -> dict[str, str]:
        """Resolved settings a resume must share with the checkpoint (the loop refuses a mismatch)."""
        return {"student_prediction": self.student_prediction}

    def shipped_weights(self, model: torch.nn.Module | None = None) -> AbstractContextManager[Any]:
        """Context in which the student network (or ``model``, a whole copy of it) holds the weights validation
        and export use: the EMA's, if on."""
        return self.student_ema.swapped_in(model) if self.student_ema is not None else nullcontext()

    # --- sampling, validation, export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: torch.nn.Module, prompts: list[str], steps: int, noise: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The student's few-step sampler: x0 prediction, re-noise to the next grid timestep, repeat
        (deterministic: DDIM / Euler steps on the same grid the export's scheduler uses)."""
        student = self.student(model)
        embeds = student.encode_prompts(prompts)
        was_training = model.training
        model.eval()
        denoise = lambda x, t: student.predict(x, t, embeds, **self.w_kwargs(x))  # noqa: E731
        if self.deterministic:
            out = sample_ddim(denoise, noise, deterministic_grid(self.teacher.schedule, steps), self.teacher.schedule)
        else:
            out = sample_consistency(denoise, noise, few_step_timesteps(self.teacher.schedule, steps, LCM_ORIGINAL_STEPS),
                                     self.teacher.schedule, torch.Generator().manual_seed(seed), self.scaling)
        model.train(was_training)
        return out

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path, accelerator: Accelerator) -> None:
        from stepdistill.sampling import decode, initial_noise

        prompts = self.cfg.validation_prompts
        noise = initial_noise(self.teacher, len(prompts), seed=0)
        with self.shipped_weights():
            grids = {k: decode(self.teacher, self.sample(model, prompts, k, noise)) for k in sorted(set(self.cfg.student_steps))}
        write_validation(grids, step, out_dir, accelerator)

    def scheduler_spec(self) -> tuple[str, dict[str, Any]]:
        """The diffusers scheduler (and options) whose N-step schedule is the one the student was trained on."""
        if self.teacher.schedule.kind == "flow":
            return "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": not self.deterministic}
        output = {} if self.student_prediction == self.teacher.prediction_type else {"prediction_type": self.student_prediction}
        if self.deterministic:
            return "DDIMScheduler", {"timestep_spacing": "trailing", **output}
        return "LCMScheduler", {"timestep_scaling": self.cfg.timestep_scaling_factor,
                                "original_inference_steps": LCM_ORIGINAL_STEPS, **output}

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        with self.shipped_weights(model):
            self._write_export(model, out_dir)

    def _write_export(self, model: torch.nn.Module, out_dir: Path) -> None:
        name, kwargs = self.scheduler_spec()
        steps = max(self.cfg.student_steps)
        grid_meta = sampling_grid_meta(self.teacher)
        if self.cfg.use_lora:
            write_lora(model, self.teacher, out_dir, scheduler=name, method="ladd-lora", scheduler_kwargs=kwargs,
                       extra_meta=grid_meta)
        else:
            export = copy.copy(self.teacher.pipe)
            scheduler = getattr(diffusers, name).from_config(self.teacher.pipe.scheduler.config, **kwargs)
            export.register_modules(scheduler=scheduler)
            export.register_modules(**{self.teacher.denoiser_name: model})
            export.save_pretrained(out_dir, safe_serialization=True)
            meta = {"method": "ladd", "guidance_scale": self.student_guidance, **grid_meta}
            (out_dir / STUDENT_META).write_text(json.dumps(meta))
        setup = scheduler_setup(name, kwargs)
        sigmas = uniform_call_sigmas(steps) if grid_meta else None
        write_model_card(out_dir, self.cfg, self.teacher, lora=self.cfg.use_lora, steps=steps, guidance_scale=self.student_guidance,
                         scheduler_setup=setup, call_sigmas=sigmas, student_prediction=self.student_prediction)
