"""The shipped trainer configs parse with their trainer's options and describe the run the README says."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepdistill.config import load_config
from stepdistill.methods.ladd import LADDConfig
from stepdistill.methods.lcm import LCMConfig
from stepdistill.methods.progressive import ProgressiveConfig, plan_phases

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER_CONFIGS = {"lcm_": LCMConfig, "progressive_": ProgressiveConfig, "ladd_": LADDConfig}


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(tuple(TRAINER_CONFIGS))),
                         ids=lambda p: p.name)
def test_shipped_trainer_configs_parse(path):
    cls = next(c for prefix, c in TRAINER_CONFIGS.items() if path.name.startswith(prefix))
    cfg = load_config(cls, path)
    assert cfg.pretrained_teacher_model == ("tiny-sd3" if "sd3" in path.name else "tiny-sd") and cfg.max_train_steps > 0


def test_sdxl_example_config_parses_and_only_its_paths_are_placeholders():
    """The SDXL example is for a user's own GPU run: it must parse with the LCM options and ask for SDXL's size."""
    cfg = load_config(LCMConfig, CONFIGS / "examples" / "lcm_lora_sdxl.yaml")
    assert cfg.pretrained_teacher_model.startswith("path/to/") and cfg.dataset.startswith("path/to/")
    assert cfg.resolution == 1024 and cfg.use_lora and cfg.lora_rank == 64 and cfg.mixed_precision == "bf16"


def test_flux_example_config_parses_and_asks_for_half_precision_teacher_weights():
    """The FLUX.1-dev example is for a user's own GPU run: LADD options, Flux's size and T5 length, a bf16 teacher."""
    cfg = load_config(LADDConfig, CONFIGS / "examples" / "ladd_lora_flux_dev.yaml")
    assert cfg.pretrained_teacher_model.startswith("path/to/") and cfg.dataset.startswith("path/to/")
    assert cfg.resolution == 1024 and cfg.max_sequence_length == 512 and cfg.teacher_weight_dtype == "bf16"
    assert cfg.use_lora and cfg.lora_forward == "branched" and cfg.gradient_checkpointing and cfg.real_data == "real"


def test_best_progressive_recipe_plans_guidance_then_one_long_round():
    cfg = load_config(ProgressiveConfig, CONFIGS / "progressive_tiny_sd_gd.yaml")
    phases = plan_phases(cfg)
    assert [(p.kind, p.student_steps, p.first_step, p.end_step) for p in phases] == [
        ("guidance", 8, 0, 600), ("halving", 4, 600, 2600)]
    assert cfg.lr_per_round and cfg.teacher_precision == "auto" and cfg.max_train_steps == 2600


def test_dit_progressive_recipe_halves_from_16_to_1_without_guidance_stage():
    cfg = load_config(ProgressiveConfig, CONFIGS / "progressive_tiny_sd3.yaml")
    phases = plan_phases(cfg)
    assert [(p.kind, p.student_steps, p.first_step) for p in phases] == [
        ("halving", 8, 0), ("halving", 4, 1000), ("halving", 2, 2000), ("halving", 1, 3000)]
    assert cfg.w_min == cfg.w_max and cfg.lr_per_round and cfg.max_train_steps == 4000


def test_dit_ladd_recipe_is_the_measured_run():
    dit = load_config(LADDConfig, CONFIGS / "ladd_lora_tiny_sd3.yaml")
    unet = load_config(LADDConfig, CONFIGS / "ladd_lora_tiny_sd.yaml")
    assert dit.max_train_steps == 600 and dit.student_steps == [1, 2, 4]
    # the README's run was the UNet config with only the teacher and step count changed
    same = ("lora_rank", "learning_rate", "adversarial_weight", "distill_weight", "train_batch_size", "synthetic_steps",
            "synthetic_guidance_scale", "timestep_warmup_steps", "disc_learning_rate", "gan_loss", "seed")
    assert [getattr(dit, k) for k in same] == [getattr(unet, k) for k in same]


def test_dit_ladd_refine_recipe_is_the_measured_run():
    refine = load_config(LADDConfig, CONFIGS / "ladd_refine_tiny_sd3.yaml")
    progressive = load_config(ProgressiveConfig, CONFIGS / "progressive_tiny_sd3.yaml")
    # it starts from the 1-step round that progressive_tiny_sd3.yaml writes by default
    assert refine.init_student_from == f"{progressive.output_dir}/rounds/round-3-1steps" and progressive.end_steps == 1
    measured = dict(use_lora=False, student_steps=[1], timestep_warmup_steps=0, learning_rate=1e-5, adversarial_weight=0.5,
                    distill_weight=1.0, max_train_steps=400, train_batch_size=32, synthetic_steps=25, synthetic_guidance_scale=4.0)
    assert {k: getattr(refine, k) for k in measured} == measured


def test_unet_ladd_refine_recipe_is_the_measured_run():
    refine = load_config(LADDConfig, CONFIGS / "ladd_refine_tiny_sd.yaml")
    progressive = load_config(ProgressiveConfig, CONFIGS / "progressive_tiny_sd_gd.yaml")
    # it starts from the 4-step student that progressive_tiny_sd_gd.yaml writes by default
    assert refine.init_student_from == f"{progressive.output_dir}/pipeline" and progressive.end_steps == 4
    measured = dict(use_lora=False, student_steps=[4], student_sampler="deterministic", deterministic_loss="final",
                    timestep_warmup_steps=0, learning_rate=1e-5, lr_warmup_steps=50, adversarial_weight=0.5, distill_weight=1.0,
                    max_train_steps=1400, train_batch_size=32, synthetic_steps=25, synthetic_guidance_scale=4.0,
                    pretrained_teacher_model="tiny-sd", real_data="real", ema_decay=0.99)
    assert {k: getattr(refine, k) for k in measured} == measured


def test_unet_fewer_step_recipes_chain_from_the_4_step_refinement_with_a_v_output():
    four = load_config(LADDConfig, CONFIGS / "ladd_refine_tiny_sd.yaml")
    one = load_config(LADDConfig, CONFIGS / "ladd_refine_tiny_sd_1step.yaml")
    two = load_config(LADDConfig, CONFIGS / "ladd_refine_tiny_sd_2step.yaml")
    assert one.init_student_from == f"{four.output_dir}/pipeline" and two.init_student_from == f"{one.output_dir}/pipeline"
    shared = ["use_lora", "student_sampler", "deterministic_loss", "real_data", "adversarial_weight", "distill_weight",
              "synthetic_steps", "synthetic_guidance_scale", "train_batch_size", "ema_decay", "disc_learning_rate"]
    assert all(getattr(one, k) == getattr(four, k) == getattr(two, k) for k in shared)
    measured_one = dict(student_steps=[1], student_prediction="v_prediction", learning_rate=3e-5, max_train_steps=1400)
    measured_two = dict(student_steps=[2], student_prediction="auto", learning_rate=3e-5, max_train_steps=400)
    assert {k: getattr(one, k) for k in measured_one} == measured_one
    assert {k: getattr(two, k) for k in measured_two} == measured_two


def test_shipped_accelerate_configs_load_with_accelerates_own_reader():
    """Each launch config is read by accelerate itself (unknown keys would fail), and it asks for the launcher
    its name promises: the CPU config for torchrun's several processes (accelerate's MULTI_CPU type would start
    one process without an MPI hostfile), the GPU ones for DDP, FSDP and DeepSpeed."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"multi_cpu_2proc.yaml": ("MULTI_GPU", 2, True), "ddp_8gpu.yaml": ("MULTI_GPU", 8, False),
                "fsdp_2node.yaml": ("FSDP", 16, False), "deepspeed_zero2.yaml": ("DEEPSPEED", 8, False)}
    found = {}
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        found[path.name] = (config.distributed_type.value, config.num_processes, bool(config.use_cpu))
    assert found == expected
